"""The nixl KV transport between two processes: bit-exact against the torch transport, many
concurrent transfers settled out of order, and timeouts / bad sizes that leave nothing held.

One two-rank run (module fixture) plays every scenario and writes what each rank saw; the tests
below assert on it, so the processes start once.
"""
from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

from dist_utils import run_ranks
from disagg.kv.connector import TorchKVConnector, make_connector

N_CONCURRENT = 24
SHORT = 1.5  # timeout (s) of the connector used for the failure cases
RACE = 2.5  # receiver timeout (s) in the claimed-write race; the write lands at 1.5x that


def _cache(seed):
    from disagg import PagedKVCache

    g = torch.Generator().manual_seed(seed)
    c = PagedKVCache(2, 32, 16, 2, 32)
    for rid, n in (("a", 37), ("b", 5), ("c", 130)):
        c.allocate(rid, n)
    for t in c.caches:
        t.copy_(torch.randn(t.shape, generator=g))
    return c


def _payload(i):
    n = 1000 + (i * 7919) % 300_000 + (2 << 20 if i % 5 == 0 else 0)
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)


def _wait(conn, n, timeout=60.0):
    out, t0 = [], time.monotonic()
    while len(out) < n and time.monotonic() - t0 < timeout:
        out += conn.poll()
        time.sleep(0.002)
    return out


def _scenario(rank, world, outdir):
    import gc

    import torch.distributed as dist

    from disagg import PagedKVCache

    store = dist.distributed_c10d._get_default_store()
    group = dist.new_group([0, 1], backend="gloo")
    tconn = TorchKVConnector(group, timeout_s=60)
    # a 1 MiB first arena segment: the larger transfers make it grow (partial metadata)
    nconn = make_connector("nixl", store=store, rank=rank, timeout_s=60, arena_mb=1,
                           max_arena_mb=256)
    short = make_connector("nixl", store=store, rank=rank, timeout_s=SHORT, arena_mb=1,
                           namespace="disagg-kv-nixl-short")
    res = {}
    src = _cache(7)

    # 1. the same packed buffers through both transports
    rids = ("a", "b", "c")
    if rank == 0:
        for i, rid in enumerate(rids):
            tconn.send(rid, src.pack(rid), 1, 100 + i)
            nconn.send(rid, src.pack(rid), 1, 100 + i)
        res["rt_send"] = sorted((r.key, r.ok) for r in _wait(tconn, 3) + _wait(nconn, 3))
    else:
        for i, rid in enumerate(rids):
            tconn.recv(rid, src.pack_nbytes(rid), 0, 100 + i)
            nconn.recv(rid, src.pack_nbytes(rid), 0, 100 + i)
        via_t = {r.key: r.buffer for r in _wait(tconn, 3) if r.ok}
        via_n = {r.key: r.buffer for r in _wait(nconn, 3) if r.ok}
        dst = PagedKVCache(2, 64, 8, 2, 32)  # another block size on the receiver
        same, exact = [], []
        for rid in rids:
            same.append(rid in via_n and rid in via_t and torch.equal(via_n[rid], via_t[rid]))
            if rid in via_n:
                dst.unpack(rid, via_n[rid])
                exact.append(all(torch.equal(a, b) for layer in range(2)
                                 for a, b in zip(src.gather(layer, rid), dst.gather(layer, rid))))
        res["rt_recv"] = {"same_as_torch": same, "unpack_exact": exact}
        del via_n, via_t, dst
    dist.barrier()

    # 2. 24 transfers at once: receives posted in a shuffled order, a third of them only after
    # the sends queued (those senders wait for the receiver's descriptor first)
    order = list(range(N_CONCURRENT))
    random.Random(3).shuffle(order)
    if rank == 1:
        for i in order[: N_CONCURRENT // 3 * 2]:
            nconn.recv(f"x{i}", _payload(i).numel(), 0, 1000 + i)
    dist.barrier()
    if rank == 0:
        for i in range(N_CONCURRENT):
            nconn.send(f"x{i}", _payload(i), 1, 1000 + i)
        got = _wait(nconn, N_CONCURRENT)
        res["cc_send"] = sorted((r.key, r.ok) for r in got)
    else:
        time.sleep(0.3)
        for i in order[N_CONCURRENT // 3 * 2:]:
            nconn.recv(f"x{i}", _payload(i).numel(), 0, 1000 + i)
        got = _wait(nconn, N_CONCURRENT)
        exact = [r.key for r in got if r.ok and torch.equal(r.buffer, _payload(int(r.key[1:])))]
        res["cc_recv"] = {"ok": sorted(r.key for r in got if r.ok), "exact": sorted(exact),
                          "finish_order": [r.key for r in got],
                          "post_order": [f"x{i}" for i in order],
                          "errors": [r.error for r in got if not r.ok]}
        res["arena_grew"] = nconn.arena.total > (1 << 20)
    del got
    gc.collect()
    dist.barrier()
    time.sleep(0.2)
    res["cc_state"] = nconn.debug_state()
    res["cc_keys_left"] = [t for t in range(N_CONCURRENT)
                           if nconn.store.check([f"st/{nconn._key(0, 1, 1000 + t)}"])]

    # 3. failures with a short timeout
    # (a) a receive nobody sends to times out; the late sender then fails at once
    if rank == 1:
        t0 = time.monotonic()
        short.recv("ghost", 4096, 0, 1)
        r = _wait(short, 1)[0]
        res["a_recv"] = (r.ok, time.monotonic() - t0, r.error)
    dist.barrier()
    if rank == 0:
        t0 = time.monotonic()
        short.send("ghost", torch.ones(4096, dtype=torch.uint8), 1, 1)
        r = _wait(short, 1)[0]
        res["a_send"] = (r.ok, time.monotonic() - t0, r.error)
    dist.barrier()
    # (b) a send nobody receives times out; the late receiver then fails at once
    if rank == 0:
        t0 = time.monotonic()
        short.send("lost", torch.ones(4096, dtype=torch.uint8), 1, 2)
        r = _wait(short, 1)[0]
        res["b_send"] = (r.ok, time.monotonic() - t0, r.error)
    dist.barrier()
    if rank == 1:
        t0 = time.monotonic()
        short.recv("lost", 4096, 0, 2)
        r = _wait(short, 1)[0]
        res["b_recv"] = (r.ok, time.monotonic() - t0, r.error)
    dist.barrier()
    # (c) sizes that disagree fail both sides with a message naming them
    if rank == 0:
        short.send("odd", torch.ones(999, dtype=torch.uint8), 1, 3)
    else:
        short.recv("odd", 1000, 0, 3)
    r = _wait(short, 1)[0]
    res["c"] = (r.ok, r.error)
    dist.barrier()
    # (d) the receiver times out while the sender is writing: it waits for the write's
    # outcome instead of cancelling, and gets the bytes
    race = make_connector("nixl", store=store, rank=rank, timeout_s=20 if rank == 0 else RACE,
                          arena_mb=1, namespace="disagg-kv-nixl-race")
    data = _payload(3)
    if rank == 0:
        write = race._write
        race._write = lambda *a: (time.sleep(RACE * 1.5), write(*a))[1]  # claimed, then slow
        race.send("slow", data, 1, 4)
    else:
        t0 = time.monotonic()
        race.recv("slow", data.numel(), 0, 4)
    r = _wait(race, 1)[0]
    res["d"] = (r.ok, r.error, r.ok and r.kind == "recv" and torch.equal(r.buffer, data),
                time.monotonic() - t0 if rank == 1 else 0.0)
    del r
    dist.barrier()
    gc.collect()
    time.sleep(0.2)
    res["race_state"] = race.debug_state()
    res["short_state"] = short.debug_state()
    res["short_keys_left"] = [t for t in (1, 2, 3)
                              if short.store.check([f"st/{short._key(0, 1, t)}"])]
    dist.barrier()
    for c in (tconn, nconn, short, race):
        c.close()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("nixl")
    run_ranks(2, _scenario, str(out), timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_round_trip_bit_exact_and_equal_to_torch_transport(runs):
    snd, rcv = runs
    assert snd["rt_send"] == sorted([[k, True] for k in "abc"] * 2)
    assert rcv["rt_recv"]["same_as_torch"] == [True, True, True]
    assert rcv["rt_recv"]["unpack_exact"] == [True, True, True]


def test_concurrent_transfers_out_of_order(runs):
    snd, rcv = runs
    keys = sorted(f"x{i}" for i in range(N_CONCURRENT))
    assert snd["cc_send"] == [[k, True] for k in keys]
    assert rcv["cc_recv"]["errors"] == []
    assert rcv["cc_recv"]["exact"] == keys
    assert rcv["arena_grew"]
    for r in runs:  # slots back in the arena, nothing registered, no store keys left
        st = r["cc_state"]
        assert st["arena_in_use"] == 0 and st["send_registrations"] == 0, st
        assert st["waiters"] == 0 and st["xfers"] == 0 and st["arena_quarantined"] == 0, st
        assert r["cc_keys_left"] == []


def test_timeouts_races_and_bad_sizes_leave_nothing_held(runs):
    snd, rcv = runs
    ok, secs, err = rcv["a_recv"]
    assert not ok and "timed out" in err and SHORT * 0.8 < secs < SHORT * 6, (err, secs)
    ok, secs, err = snd["a_send"]
    assert not ok and "gave up" in err and secs < SHORT, (err, secs)  # at once, no waiting
    ok, secs, err = snd["b_send"]
    assert not ok and "did not post" in err and SHORT * 0.8 < secs < SHORT * 6, (err, secs)
    ok, secs, err = rcv["b_recv"]
    assert not ok and "gave up" in err and secs < SHORT, (err, secs)
    ok, err = snd["c"]
    assert not ok and "expects 1000 bytes" in err and "999" in err, err
    ok, err = rcv["c"]
    assert not ok and "failed" in err, err
    ok, err, _, _ = snd["d"]
    assert ok, err
    ok, err, exact, secs = rcv["d"]
    assert ok and exact and secs > RACE, (err, secs)  # past its own timeout, and no loss
    for r in runs:
        assert r["race_state"]["arena_in_use"] == 0 and r["race_state"]["send_registrations"] == 0
        st = r["short_state"]
        assert st["arena_in_use"] == 0 and st["send_registrations"] == 0, st
        assert st["waiters"] == 0 and st["xfers"] == 0, st
        assert r["short_keys_left"] == []


def test_make_connector_nixl_needs_store_and_rank():
    with pytest.raises(ValueError, match="store"):
        make_connector("nixl")
    with pytest.raises(ValueError, match="torch or nixl"):
        make_connector("carrier-pigeon")
