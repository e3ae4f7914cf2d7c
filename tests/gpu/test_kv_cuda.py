"""CUDA paged-KV ops against the CPU ops and the references on fresh random inputs: packed
buffers, unpacked caches, quantized bytes and scales must be bit-identical to the CPU op's."""
import itertools
import random
import sys
from pathlib import Path

import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_kv_ops import make_caches, random_table  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANTS = ["none", "int8", "fp8_e4m3"]


def cuda_list(caches):
    return [c.to(DEV) for c in caches]


def poison_cache(nbytes=64 << 20):
    """Fill memory the caching allocator hands out next with 0xff bytes, so outputs the op
    allocates start poisoned and an unwritten byte shows."""
    torch.full((nbytes // 4,), -1, dtype=torch.int32, device=DEV)


PACK_CASES = [
    (bs, h, d, dt, q, lay)
    for i, (bs, h, d, q, lay) in enumerate(itertools.product(
        [1, 8, 16, 64], [1, 2, 8], [32, 128], QUANTS, ["NHD", "HND"]))
    for dt in [DTYPES[i % 3]]
]


@pytest.mark.parametrize("bs,heads,dim,dtype,quant,layout", PACK_CASES)
def test_pack_matches_cpu_and_reference(bs, heads, dim, dtype, quant, layout):
    T = 2 * bs + bs // 2 + 1
    nb = -(-T // bs) + 5
    caches = make_caches(3, nb, bs, heads, dim, dtype, layout, seed=bs * 7 + heads)
    table = random_table(T, bs, nb, seed=heads, extra=2)
    hs, he = (1, heads) if heads > 1 else (0, 1)
    kw = dict(layer_start=1, layer_end=3, head_start=hs, head_end=he, quant=quant, layout=layout)
    want = ops.kv_pack(caches, table, T, **kw)
    assert torch.equal(want, ref.kv_pack(caches, table, T, **kw))
    poison_cache()
    got = ops.kv_pack(cuda_list(caches), table.to(DEV), T, **kw)
    assert torch.equal(got.cpu(), want)
    # pack_into a poisoned, larger buffer: the packed prefix equals, the tail is untouched
    out = torch.full((want.numel() + 100,), 0xAB, dtype=torch.uint8, device=DEV)
    ops.kv_pack_into(cuda_list(caches), table.long().to(DEV), T, out, **kw)
    assert torch.equal(out[: want.numel()].cpu(), want)
    assert bool((out[want.numel():] == 0xAB).all())


UNPACK_CASES = [
    (sbs, dbs, sdt, ddt, q, slay, dlay)
    for i, (sbs, dbs, q) in enumerate(itertools.product([1, 16, 64], [8, 16, 256], QUANTS))
    for sdt, ddt, slay, dlay in [(DTYPES[i % 3], DTYPES[(i + i // 3) % 3],
                                  ["NHD", "HND"][i % 2], ["NHD", "HND"][(i // 2) % 2])]
]


@pytest.mark.parametrize("sbs,dbs,sdt,ddt,quant,slay,dlay", UNPACK_CASES)
def test_unpack_matches_cpu(sbs, dbs, sdt, ddt, quant, slay, dlay):
    T, H, D = 70, 4, 64
    src = make_caches(2, -(-T // sbs) + 3, sbs, H, D, sdt, slay, seed=sbs)
    stable = random_table(T, sbs, -(-T // sbs) + 3, seed=3)
    buf = ops.kv_pack(src, stable, T, head_start=1, head_end=3, quant=quant, layout=slay)
    nb = -(-T // dbs) + 4
    dst = make_caches(3, nb, dbs, H, D, ddt, dlay, seed=dbs + 1)
    dtable = random_table(T, dbs, nb, seed=5)
    want = [c.clone() for c in dst]
    ops.kv_unpack(buf, want, dtable, layer_start=1, head_start=2, layout=dlay)
    got = cuda_list(dst)
    ops.kv_unpack(buf.to(DEV), got, dtable.to(DEV), layer_start=1, head_start=2, layout=dlay)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))  # untouched slots too


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact(dtype):
    T = 200
    src = cuda_list(make_caches(4, 20, 16, 8, 128, dtype, seed=11))
    table = random_table(T, 16, 20, seed=2).to(DEV)
    buf = ops.kv_pack(src, table, T)
    dst = [torch.randn_like(c, dtype=torch.float32).to(dtype) for c in src]
    dtable = random_table(T, 16, 20, seed=9).to(DEV)
    ops.kv_unpack(buf, dst, dtable)
    again = ops.kv_pack(dst, dtable, T)
    assert torch.equal(again[64:], buf[64:])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["accepted_path", "identity", "backwards", "shuffled_overlap",
                                  "duplicates", "empty"])
def test_compact_matches_cpu(layout, dtype, kind):
    bs, T = 8, 60
    caches = make_caches(3, 10, bs, 2, 32, dtype, layout, seed=31)
    table = random_table(T, bs, 10, seed=4)
    rng = random.Random(len(kind))
    src, dst = {
        "accepted_path": (sorted(rng.sample(range(40, 60), 7)), 40),
        "identity": (list(range(20, 30)), 20),
        "backwards": (list(range(10, 25)), 15),
        "shuffled_overlap": (rng.sample(range(30, 50), 16), 33),
        "duplicates": ([45, 45, 41, 50, 41], 42),
        "empty": ([], 12),
    }[kind]
    src_t = torch.tensor(src, dtype=torch.int64)
    want = [c.clone() for c in caches]
    ops.kv_compact(want, table, src_t, dst, layout=layout)
    ref_c = [c.clone() for c in caches]
    ref.kv_compact(ref_c, table, src_t, dst, layout=layout)
    got = cuda_list(caches)
    ops.kv_compact(got, table.to(DEV), src_t.to(torch.int32).to(DEV), dst, layout=layout)
    for a, b, c in zip(got, want, ref_c):
        assert torch.equal(a.cpu(), b) and torch.equal(b, c)


def test_many_layers_take_several_launches():
    # more layers than one launch carries (64): every layer must still be packed
    caches = make_caches(70, 4, 8, 1, 32, torch.bfloat16, seed=3)
    table = random_table(20, 8, 4)
    want = ops.kv_pack(caches, table, 20, quant="int8")
    assert torch.equal(ops.kv_pack(cuda_list(caches), table.to(DEV), 20, quant="int8").cpu(), want)


def test_bad_block_id_never_read():
    # on the device an out-of-range id cannot raise without a sync: its block packs as zeros
    caches = make_caches(1, 4, 8, 2, 32, torch.float32, seed=1)
    table = torch.tensor([1, 9, 2], dtype=torch.int32)
    buf = ops.kv_pack(cuda_list(caches), table.to(DEV), 20)
    torch.cuda.synchronize()
    payload = buf[64:64 + 2 * 20 * 2 * 32 * 4].view(torch.float32).view(2, 20, 2, 32).cpu()
    assert bool((payload[:, 8:16] == 0).all())
    good = ops.kv_pack(caches, torch.tensor([1, 0, 2], dtype=torch.int32), 20)[64:]
    good = good[: 2 * 20 * 2 * 32 * 4].view(torch.float32).view(2, 20, 2, 32)
    assert torch.equal(payload[:, :8], good[:, :8]) and torch.equal(payload[:, 16:], good[:, 16:])


def test_errors_match_cpu():
    caches = make_caches(2, 4, 8, 2, 32, torch.float32, seed=1)
    table = random_table(20, 8, 4)
    for c_args in [
        dict(num_tokens=40),                  # table too short
        dict(num_tokens=20, head_start=2),   # empty head range
        dict(num_tokens=20, quant="int4"),
    ]:
        with pytest.raises(ValueError) as cpu_err:
            ops.kv_pack(caches, table, **c_args)
        with pytest.raises(ValueError) as cuda_err:
            ops.kv_pack(cuda_list(caches), table.to(DEV), **c_args)
        assert str(cpu_err.value).split(" (")[0] == str(cuda_err.value).split(" (")[0]
    buf = ops.kv_pack(caches, table, 20)
    bad = buf.clone()
    bad[0] ^= 1
    with pytest.raises(ValueError, match="magic"):
        ops.kv_unpack(bad.to(DEV), cuda_list(caches), table.to(DEV))
    with pytest.raises(ValueError, match="out of range"):
        ops.kv_unpack(buf.to(DEV), cuda_list(caches), torch.tensor([0, 1, 7]).to(DEV))


@pytest.mark.parametrize("quant", QUANTS)
def test_opcheck_cuda(quant):
    caches = cuda_list(make_caches(2, 6, 8, 2, 32, torch.bfloat16, seed=41))
    table = random_table(20, 8, 6, seed=1).to(DEV)
    torch.library.opcheck(torch.ops.disagg.kv_pack.default,
                          (caches, table, 20, 0, -1, 1, 2, quant, "NHD"))
    n = ops.kv_pack_nbytes(2, 20, 1, 32, torch.bfloat16, quant, 8)
    torch.library.opcheck(torch.ops.disagg.kv_pack_into.default,
                          (caches, table, 20, torch.empty(n, dtype=torch.uint8, device=DEV), 0, -1,
                           1, 2, quant, "NHD"))
    buf = ops.kv_pack(caches, table, 20, quant=quant)
    dst = cuda_list(make_caches(2, 4, 16, 2, 32, torch.float16, "HND", seed=2))
    torch.library.opcheck(torch.ops.disagg.kv_unpack.default,
                          (buf, dst, random_table(20, 16, 4).to(DEV), 0, 0, "HND"))
    torch.library.opcheck(torch.ops.disagg.kv_compact.default,
                          (caches, table, torch.tensor([12, 15, 19], device=DEV), 10, "NHD"))
