"""KV hand-off: the engine's prefill-only / decode-from-KV hooks and the torch connector
(gloo point-to-point between two processes, other block size on the receiver, timeouts)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import disagg  # noqa: F401
from disagg import PagedKVCache, SamplingParams
from disagg.engine import Engine
from disagg.kv.connector import TorchKVConnector, make_connector


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from disagg.model.tiny import make_checkpoint

    path = str(tmp_path_factory.mktemp("tiny") / "mixtral")
    make_checkpoint("mixtral", path, seed=5)
    return path


def test_prefill_handoff_then_decode_from_kv_matches_engine(model):
    prompts = [[5 + i for i in range(n)] for n in (3, 17, 40)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = Engine(model)
    for p in prompts:
        ref.add_request(p, sp)
    want = {o.request_id: o.outputs[0].token_ids for o in ref.run()}

    pre = Engine(model, block_size=16)
    dec = Engine(model, block_size=8)  # another block size on the decode side
    bufs = {}
    pre.on_finish_kv = lambda req, reason: bufs.__setitem__(req.request_id,
                                                            pre.kv.pack(req.request_id))
    for i, p in enumerate(prompts):
        pre.add_request(p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                        request_id=f"req-{i}")
    firsts = {o.request_id: o.outputs[0].token_ids[0] for o in pre.run()}
    assert pre.kv.num_free_blocks == pre.kv.num_blocks  # prefill side freed after packing
    for i, p in enumerate(prompts):
        dec.add_request_from_kv(p, firsts[f"req-{i}"], bufs[f"req-{i}"], sp,
                                request_id=f"req-{i}")
    got = {o.request_id: o.outputs[0].token_ids for o in dec.run()}
    assert got == want
    assert dec.kv.num_free_blocks == dec.kv.num_blocks


def test_decode_from_kv_bad_input(model):
    dec = Engine(model, num_blocks=8, block_size=8)
    pre = PagedKVCache(2, 8, 16, 2, 32)
    pre.allocate("a", 5)
    buf = pre.pack("a")
    with pytest.raises(ValueError, match="tokens"):
        dec.add_request_from_kv([1, 2, 3], 7, buf)  # buffer does not cover this prompt
    with pytest.raises(ValueError, match="first_token"):
        dec.add_request_from_kv([1, 2, 3, 4, 5], 10 ** 6, buf)
    from disagg import OutOfBlocksError

    pre.allocate("big", 30)
    dec.kv.allocate("hog", 40)  # 5 of 8 blocks taken: 31 tokens need 4
    with pytest.raises(OutOfBlocksError):
        dec.add_request_from_kv(list(range(2, 32)), 7, pre.pack("big"))
    dec.kv.free("hog")
    assert dec.kv.num_free_blocks == 8 and not dec.requests
    with pytest.raises(ValueError):
        make_connector("carrier-pigeon")
    with pytest.raises(ValueError):
        make_connector("torch")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(rank, port, q):
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1], backend="gloo")
    conn = TorchKVConnector(group, timeout_s=3.0)
    g = torch.Generator().manual_seed(0)
    src = PagedKVCache(2, 16, 16, 2, 32)
    for rid, n in (("a", 37), ("b", 5)):
        src.allocate(rid, n)
    for c in src.caches:
        c.copy_(torch.randn(c.shape, generator=g))

    def wait(n):
        out, t0 = [], time.time()
        while len(out) < n and time.time() - t0 < 20:
            out += conn.poll()
            time.sleep(0.005)
        return out
    if rank == 0:
        for tag, rid in ((11, "a"), (12, "b")):
            conn.send(rid, src.pack(rid), 1, tag)
        res = wait(2)
        q.put(("send", sorted((r.key, r.ok) for r in res)))
    else:
        dst = PagedKVCache(2, 32, 8, 2, 32)
        # receives posted in the other order: tags match them up
        conn.recv("b", src.pack("b").numel(), 0, 12)
        conn.recv("a", src.pack("a").numel(), 0, 11)
        res = wait(2)
        same = []
        for r in res:
            dst.unpack(r.key, r.buffer)
            same.append(all(torch.equal(src.gather(layer, r.key)[0], dst.gather(layer, r.key)[0])
                            and torch.equal(src.gather(layer, r.key)[1],
                                            dst.gather(layer, r.key)[1]) for layer in range(2)))
        # nobody sends tag 99: the receive fails after its timeout instead of hanging
        t0 = time.time()
        conn.recv("ghost", 128, 0, 99)
        ghost = wait(1)
        q.put(("recv", [r.ok for r in res], same, ghost[0].ok if ghost else None,
               time.time() - t0))
    dist.barrier()
    conn.close()


def test_torch_connector_between_processes():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_pair, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((m[0], m[1:]) for m in (q.get(timeout=90), q.get(timeout=90)))
    for p in procs:
        p.join(timeout=30)
    assert got["send"][0] == [("a", True), ("b", True)]
    oks, same, ghost_ok, ghost_s = got["recv"]
    assert oks == [True, True] and same == [True, True]
    assert ghost_ok is False and ghost_s < 15
