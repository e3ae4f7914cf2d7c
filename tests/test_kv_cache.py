"""PagedKVCache: allocator bookkeeping, copy-on-write and data integrity under random use."""
import random

import pytest
import torch

import disagg
from disagg.kv import OutOfBlocksError, PagedKVCache


def _small(num_blocks=16, block_size=4, layers=2, layout="NHD", dtype=torch.float32):
    return PagedKVCache(layers, num_blocks, block_size, 2, 8, dtype=dtype, layout=layout)


def test_exported():
    assert disagg.PagedKVCache is PagedKVCache
    assert issubclass(OutOfBlocksError, RuntimeError)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_shapes(layout):
    c = PagedKVCache(3, 10, 16, 4, 32, dtype=torch.bfloat16, layout=layout)
    assert len(c.caches) == 3
    want = (10, 2, 16, 4, 32) if layout == "NHD" else (10, 2, 4, 16, 32)
    assert all(t.shape == want and t.dtype == torch.bfloat16 for t in c.caches)


def test_allocate_append_truncate_free():
    c = _small()
    c.allocate("a", 5)
    assert c.num_tokens("a") == 5 and c.block_table("a").tolist() == [0, 1]
    assert c.block_table("a").dtype == torch.int32
    c.append("a", 3)
    assert c.block_table("a").numel() == 2
    c.append("a")
    assert c.block_table("a").numel() == 3 and c.num_tokens("a") == 9
    c.truncate("a", 4)
    assert c.block_ids("a") == [0] and c.num_free_blocks == 15
    c.free("a")
    assert not c.has("a") and c.num_free_blocks == 16
    c.check_invariants()


def test_slot_mapping():
    c = _small(block_size=4)
    c.allocate("x", 3)
    c.allocate("a", 10)  # blocks 1, 2, 3
    s = c.slot_mapping("a", 2, 9)
    assert s.dtype == torch.int64
    blocks = c.block_ids("a")
    assert s.tolist() == [blocks[p // 4] * 4 + p % 4 for p in range(2, 9)]
    assert c.slot_mapping("a").numel() == 10
    with pytest.raises(IndexError):
        c.slot_mapping("a", 0, 11)


def test_out_of_blocks_leaves_state_unchanged():
    c = _small(num_blocks=4, block_size=4)
    c.allocate("a", 12)
    with pytest.raises(OutOfBlocksError) as e:
        c.allocate("b", 5)
    assert e.value.needed == 2 and e.value.free == 1
    assert not c.has("b") and c.num_free_blocks == 1
    assert not c.can_allocate(5) and c.can_allocate(4)
    c.append("a", 4)
    with pytest.raises(OutOfBlocksError) as e:
        c.append("a", 1)
    assert (e.value.needed, e.value.free) == (1, 0)
    assert c.num_tokens("a") == 16
    c.check_invariants()


def test_errors():
    c = _small()
    c.allocate("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        c.allocate("a", 1)
    with pytest.raises(KeyError, match="unknown request"):
        c.append("zz")
    with pytest.raises(ValueError, match="num_tokens"):
        c.truncate("a", 2)
    with pytest.raises(ValueError, match="already exists"):
        c.fork("a", "a")
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 4, 0, 1, 8)
    with pytest.raises(ValueError, match="layout"):
        PagedKVCache(1, 4, 4, 1, 8, layout="XYZ")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_fork_copy_on_write(layout):
    c = _small(block_size=4, layout=layout)
    c.allocate("a", 6)
    k = torch.randn(6, 2, 8)
    v = torch.randn(6, 2, 8)
    for layer in range(2):
        c.write(layer, "a", 0, k, v)
    c.fork("a", "b")
    assert c.block_ids("a") == c.block_ids("b")
    assert c.stats()["shared_blocks"] == 2
    # b appends into the shared, partly filled last block: it must get its own copy
    c.append("b", 1)
    assert c.block_ids("b")[0] == c.block_ids("a")[0]
    assert c.block_ids("b")[1] != c.block_ids("a")[1]
    kn, vn = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    c.write(0, "b", 6, kn, vn)
    gk, gv = c.gather(0, "b")
    torch.testing.assert_close(gk, torch.cat([k, kn]), rtol=0, atol=0)
    torch.testing.assert_close(gv, torch.cat([v, vn]), rtol=0, atol=0)
    ak, av = c.gather(1, "a")
    torch.testing.assert_close(ak, k, rtol=0, atol=0)
    # writing into a shared full block copies it as well
    c.write(0, "b", 1, kn, vn)
    assert c.block_ids("b")[0] != c.block_ids("a")[0]
    torch.testing.assert_close(c.gather(0, "a")[0], k, rtol=0, atol=0)
    c.free("a")
    c.free("b")
    assert c.num_free_blocks == c.num_blocks
    c.check_invariants()


def test_fork_append_at_block_boundary_needs_no_copy():
    c = _small(block_size=4)
    c.allocate("a", 8)
    c.fork("a", "b")
    free = c.num_free_blocks
    c.append("b", 1)
    assert c.num_free_blocks == free - 1
    assert c.block_ids("b")[:2] == c.block_ids("a")
    c.check_invariants()


def test_stats():
    c = _small(num_blocks=8, block_size=4)
    c.allocate("a", 5)
    c.allocate("b", 4)
    c.fork("b", "c")
    s = c.stats()
    assert s["used_blocks"] == 3 and s["free_blocks"] == 5 and s["shared_blocks"] == 1
    assert s["occupancy"] == pytest.approx(3 / 8)
    assert s["filled_slots"] == 9
    assert s["internal_fragmentation"] == pytest.approx(1 - 9 / 12)
    assert s["requests"] == {"a": 2, "b": 1, "c": 1}
    assert s["sharing_saved_blocks"] == 1
    assert s["free_runs"] == 1 and s["largest_free_run"] == 5


def test_check_invariants_detects_corruption():
    c = _small()
    c.allocate("a", 5)
    c._refcount[c.block_ids("a")[0]] += 1
    with pytest.raises(AssertionError, match="refcount"):
        c.check_invariants()
    c._refcount[c.block_ids("a")[0]] -= 1
    c._free.pop()
    with pytest.raises(AssertionError, match="lost"):
        c.check_invariants()


def test_random_operations_keep_invariants_and_data():
    """10,000 seeded random allocate/append/truncate/free/fork/write operations; after each,
    the invariants hold, and every request reads back exactly what was written to it."""
    rng = random.Random(1234)
    bs = 4
    c = PagedKVCache(1, 48, bs, 1, 2)
    shadow = {}  # req -> list of token values written (what gather must return)
    counter = [0.0]
    next_id = [0]

    def fresh(n):
        vals = [counter[0] + i + 1 for i in range(n)]
        counter[0] += n
        return vals

    def write_new(rid, start, vals):
        if not vals:
            return
        t = torch.tensor(vals, dtype=torch.float32).view(-1, 1, 1).expand(-1, 1, 2)
        c.write(0, rid, start, t, -t)

    for step in range(10_000):
        live = list(shadow)
        op = rng.choice(["allocate", "append", "append", "truncate", "free", "fork", "write"])
        try:
            if op == "allocate" or not live:
                rid = next_id[0]
                next_id[0] += 1
                n = rng.randint(0, 3 * bs)
                c.allocate(rid, n)
                shadow[rid] = fresh(n)
                write_new(rid, 0, shadow[rid])
            elif op == "append":
                rid = rng.choice(live)
                n = rng.randint(0, bs + 2)
                old = len(shadow[rid])
                c.append(rid, n)
                vals = fresh(n)
                write_new(rid, old, vals)
                shadow[rid] += vals
            elif op == "truncate":
                rid = rng.choice(live)
                n = rng.randint(0, len(shadow[rid]))
                c.truncate(rid, n)
                del shadow[rid][n:]
            elif op == "free":
                rid = rng.choice(live)
                c.free(rid)
                del shadow[rid]
            elif op == "fork":
                rid = rng.choice(live)
                new = next_id[0]
                next_id[0] += 1
                c.fork(rid, new)
                shadow[new] = list(shadow[rid])
            else:  # overwrite some positions of a (possibly shared) request
                rid = rng.choice(live)
                n = len(shadow[rid])
                if n:
                    a = rng.randint(0, n - 1)
                    b = rng.randint(a + 1, n)
                    vals = fresh(b - a)
                    write_new(rid, a, vals)
                    shadow[rid][a:b] = vals
        except OutOfBlocksError as e:
            assert e.needed > e.free
        c.check_invariants()
        assert set(c.request_ids()) == set(shadow)
        if shadow and step % 5 == 0:
            rid = rng.choice(list(shadow))
            k, v = c.gather(0, rid)
            want = torch.tensor(shadow[rid], dtype=torch.float32)
            assert torch.equal(k[:, 0, 0], want), f"step {step}: request {rid} K corrupted"
            assert torch.equal(v[:, 0, 1], -want), f"step {step}: request {rid} V corrupted"
    for rid in list(shadow):
        c.free(rid)
    c.check_invariants()
    assert c.num_free_blocks == c.num_blocks


def test_docs_examples_run():
    """The Python examples in docs/kv.md run as written."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "kv.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    ns = {}
    for code in blocks:
        exec(compile(code, str(doc), "exec"), ns)  # noqa: S102  (our own documentation)
