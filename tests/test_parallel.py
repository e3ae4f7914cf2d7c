"""Parallel layouts (TP, PP, EP, DP, CP and hybrids) give the single-process engine's greedy
tokens; torchrun across two "nodes" works; a dead rank ends the job with an error.

Several layouts share one launch (process start-up is the cost), gloo on CPU, fp32."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import free_port, run_ranks

from disagg import LLM, SamplingParams
from disagg.model.tiny import make_checkpoint

FAMILIES = ["mixtral", "qwen2_moe"]
PROMPT_LENS = [3, 11, 29, 50]
NEW_TOKENS = 24
ENGINE = dict(dtype="float32", max_num_batched_tokens=16, block_size=8)

# (name, layout kwargs[, engine kwargs]); the world size is tp * pp * dp * cp. With pp > 1
# the engine keeps pp steps in flight (request groups) unless pipeline="micro" or the layout
# needs lock-step replicas.
LAYOUTS_2 = [
    ("TP2", dict(tp=2)),
    ("PP2", dict(pp=2)),  # steps in flight
    ("PP2-preempt", dict(pp=2), dict(num_blocks=12)),  # 96 KV slots for 189 tokens
    ("PP2-micro", dict(pp=2), dict(pipeline="micro")),
    ("DP2", dict(dp=2)),
    ("EP2", dict(dp=2, ep=2)),  # two replicas sharing one EP group
    ("CP2", dict(cp=2)),
    ("TP2xEP2", dict(tp=2, ep=2)),  # EP across the TP ranks
]
LAYOUTS_4 = [
    ("EP4", dict(dp=4, ep=4)),
    ("EP4-over-TP2xDP2", dict(tp=2, dp=2, ep=4)),
    ("TP2xPP2", dict(tp=2, pp=2)),
    ("TP2xPP2xEP2", dict(tp=2, pp=2, ep=2)),  # EP across the TP ranks of each stage
    ("TP2xDP2xEP2-tp-experts", dict(tp=2, dp=2, ep=2, ep_over_tp=False)),
    ("CP2xTP2", dict(cp=2, tp=2)),
    ("DP2xPP2xEP2", dict(dp=2, pp=2, ep=2)),  # replicas in lock-step, micro-batched stages
]
# Sampling (temperature 0.8) checks, on the Mixtral checkpoint: seeded requests give the
# single-process tokens; unseeded ones give the same tokens on every scheduling rank.
SAMPLED_2 = ("TP2", "PP2")
SAMPLED_4 = ("TP2xPP2xEP2",)
SEED = 1234


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints and the single-process engine's greedy tokens for each."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 380, (n,), generator=g).tolist() for n in PROMPT_LENS]
    out = {}
    for i, fam in enumerate(FAMILIES):
        path = str(tmp_path_factory.mktemp(fam))
        make_checkpoint(fam, path, seed=10 + i)
        llm = LLM(path, **ENGINE)
        res = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
        out[fam] = (path, [r.outputs[0].token_ids for r in res])
        if fam == "mixtral":
            res = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               _sampled(seed=SEED))
            out["sampled"] = [r.outputs[0].token_ids for r in res]
    return prompts, out


def _sampled(seed=None, max_tokens=8):
    return SamplingParams(temperature=0.8, top_k=50, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True)


def _layouts_worker(rank, world, layouts, prompts, ckpts, sampled):
    import torch.distributed as dist

    from disagg.parallel import ParallelEngine, ParallelLayout

    from disagg.model import CausalLM

    bad = []
    sampled_ref = ckpts["sampled"]
    for fam in FAMILIES:
        path, refs = ckpts[fam]
        full = None
        for name, kw, *ekw in layouts:
            ekw = ekw[0] if ekw else {}
            eng = ParallelEngine(path, ParallelLayout(**kw), timeout_s=60, **ENGINE, **ekw)
            # Each rank loaded only its shard: at most its TP x PP share of the dense weights
            # (slack for replicated norms and routers),
            # and fewer experts with EP. DP and CP replicate the model by design.
            if full is None:
                full = sum(t.numel() * 4
                           for t in _tensors(CausalLM.from_pretrained(path, dtype="float32")))
            split = kw.get("tp", 1) * kw.get("pp", 1)
            bound = full * (1 / split + 0.1) if split > 1 else full * 0.9
            if (split > 1 or kw.get("ep", 1) > 1) and eng.model.weight_bytes() > bound:
                bad.append(f"{fam} {name}: rank {rank} holds {eng.model.weight_bytes()} "
                           f"of {full} weight bytes")
            # A shared expert (Qwen2-MoE) is TP-sharded in every layout, EP across TP included.
            for layer in eng.model.layers:
                sh = getattr(layer.mlp, "shared", None)
                if sh is not None and sh.inter * kw.get("tp", 1) != \
                        eng.model.global_config.shared_expert_intermediate_size:
                    bad.append(f"{fam} {name}: rank {rank} holds {sh.inter} shared-expert rows")
            res = eng.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                              ignore_eos=True))
            if eng.engine.kv.num_free_blocks != eng.engine.kv.num_blocks:
                bad.append(f"{fam} {name}: rank {rank} leaked KV blocks")
            if rank == 0:
                got = [r["token_ids"] for r in res]
                if got != refs:
                    bad.append(f"{fam} {name}: {got} != {refs}")
                bad += _pipeline_checks(f"{fam} {name}", kw, ekw, eng)
            if fam == "mixtral" and name in sampled:
                res = eng.generate([{"prompt_token_ids": p} for p in prompts], _sampled(SEED))
                if rank == 0 and [r["token_ids"] for r in res] != sampled_ref:
                    bad.append(f"{name} seeded sampling: {res} != {sampled_ref}")
                # Unseeded: every rank that schedules (every TP rank of the first stage) must
                # have drawn the same tokens, or their steps would silently diverge.
                eng.generate([{"prompt_token_ids": p} for p in prompts], _sampled(None))
                views = [None] * world
                dist.all_gather_object(views, eng.last_results)
                held = [v for v in views if v]
                if rank == 0 and (len(held) < max(1, kw.get("tp", 1))
                                  or any(v != held[0] for v in held)):
                    bad.append(f"{name} unseeded sampling differs across ranks: {views}")
            eng.comm.stop_watchdog()
    if bad:
        raise AssertionError("\n".join(bad))


def _pipeline_checks(name, kw, ekw, eng) -> list:
    """On global rank 0 (a first stage): with pp > 1 and no lock-step replicas, the engine kept
    pp steps in flight; a small KV pool forced preemptions."""
    bad = []
    steps = kw.get("pp", 1) > 1 and ekw.get("pipeline") != "micro" and not (
        kw.get("dp", 1) > 1 and kw.get("ep", 1) > 1)
    if steps != (eng.pipeline is not None):
        bad.append(f"{name}: pipeline {eng.pipeline}")
    elif steps and eng.pipeline.stats["max_in_flight"] != kw["pp"]:
        bad.append(f"{name}: at most {eng.pipeline.stats['max_in_flight']} steps in flight")
    if "num_blocks" in ekw and eng.engine.scheduler.num_preemptions == 0:
        bad.append(f"{name}: no preemption with {ekw['num_blocks']} blocks")
    return bad


def _tensors(m):
    """Every weight tensor of a single-process CausalLM (shared ones once)."""
    seen = {}
    for t in [m.embed, m.lm_head, m.norm]:
        seen[id(t)] = t
    for layer in m.layers:
        for t in layer.w.values():
            seen[id(t)] = t
        for name in ("gate_up", "down", "gate", "w13", "w2", "shared_gate"):
            t = getattr(layer.mlp, name, None)
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t
        sh = getattr(layer.mlp, "shared", None)
        if sh is not None:
            seen[id(sh.gate_up)], seen[id(sh.down)] = sh.gate_up, sh.down
    return seen.values()


def test_layout_groups_and_rank_order():
    from disagg.parallel import ParallelLayout

    for kw in [dict(tp=2, pp=2, dp=2), dict(tp=2, dp=4, ep=4), dict(tp=2, cp=2, pp=2),
               dict(tp=2, dp=2, ep=2, ep_over_tp=False)]:
        lay = ParallelLayout(**kw)
        W = lay.world_size
        for r in range(W):
            assert lay.rank_of(**lay.coords(r)) == r
        assert lay.coords(1)["tp"] == (1 if lay.tp > 1 else 0)  # TP is fastest
        for kind, groups in lay._groups().items():
            if kind == "ep" and lay.ep == 1:
                continue
            members = sorted(r for g in groups for r in g)
            assert members == list(range(W)), kind  # every kind partitions the world
        for g in lay._groups()["ep"]:
            assert len(g) == lay.ep
    with pytest.raises(ValueError):
        ParallelLayout(tp=2, ep=3)
    with pytest.raises(ValueError):
        ParallelLayout(dp=2, ep=2, cp=2)


def test_micro_batches_cover_the_batch_on_sequence_boundaries():
    from disagg.model import AttentionMetadata
    from disagg.parallel.model import micro_batches

    seqs = [(1, 9, [0, 1]), (1, 4, [2]), (1, 20, [3, 4, 5]), (7, 7, [6]), (5, 12, [7, 8])]
    n = sum(s[0] for s in seqs)
    meta = AttentionMetadata.build(seqs, 8, torch.arange(n))
    for m in (1, 2, 3, 4, 8):
        parts = micro_batches(meta, n, m)
        assert len(parts) == m
        assert [p[0] for p in parts][0] == 0 and parts[-1][1] == n
        for (a, b, sub), nxt in zip(parts, parts[1:] + [(n, n, None)]):
            assert b == nxt[0]
            assert sub.slot_mapping.tolist() == list(range(a, b))
            rows = sub.num_decode + sum(c.q_len for c in sub.prefills)
            assert rows == b - a
    # Two micro-batches: the cut falls on the sequence start nearest past the middle row,
    # and the second part's rows are renumbered from zero.
    (a0, b0, s0), (a1, b1, s1) = micro_batches(meta, n, 2)
    assert (b0, s0.num_decode, len(s0.prefills)) == (10, 3, 1)
    assert s1.num_decode == 0 and s1.prefills[0].start == 0 and s1.prefills[0].q_len == 5


def test_router_balances_assigned_tokens():
    from disagg.parallel import RequestRouter

    r = RequestRouter(3)
    assert [r.route(n, 10) for n in (100, 5, 5, 5, 5)] == [0, 1, 2, 1, 2]


def test_layouts_world2(ckpts):
    prompts, refs = ckpts
    run_ranks(2, _layouts_worker, LAYOUTS_2, prompts, refs, SAMPLED_2, timeout=300)


def test_layouts_world4(ckpts):
    prompts, refs = ckpts
    run_ranks(4, _layouts_worker, LAYOUTS_4, prompts, refs, SAMPLED_4, timeout=300)


def test_two_nodes_torchrun(ckpts, tmp_path):
    """Two torchrun agents on 127.0.0.1 as two nodes (one rank each), c10d rendezvous, TP2."""
    prompts, refs = ckpts
    path, ref = refs["mixtral"]
    pfile = tmp_path / "prompts.json"
    pfile.write_text(json.dumps([{"prompt_token_ids": p} for p in prompts]))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "disagg-test",
               "-m", "disagg.generate", "--model", path, "--prompts", str(pfile),
               "--output", str(tmp_path / f"out{node}.json"), "--max-tokens", str(NEW_TOKENS),
               "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--tp", "2",
               "--max-num-batched-tokens", "16", "--block-size", "8", "--report"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    # The global rank 0 writes; which agent hosts it is up to the rendezvous.
    outs = [tmp_path / f"out{n}.json" for n in range(2) if (tmp_path / f"out{n}.json").exists()]
    assert len(outs) == 1, logs
    got = [r["token_ids"] for r in json.loads(outs[0].read_text())]
    assert got == ref
    assert "all_reduce" in "".join(logs)  # the layout report was printed


def _dying_entry(rank, world, port, path, prompts, timeout_s, result_dir, layout):
    import datetime

    import torch.distributed as dist

    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    from disagg.parallel import ParallelEngine, ParallelLayout

    eng = ParallelEngine(path, ParallelLayout(**layout), timeout_s=timeout_s, **ENGINE)
    if rank == 1:  # TP2: the other TP rank; PP2: the last stage, with steps in flight
        fwd = eng.model.stage_forward

        def dying(*a, **k):
            if eng.model.forward_calls >= 3:
                os._exit(7)  # no goodbye: the peer finds out from the transport or the clock
            return fwd(*a, **k)

        eng.model.stage_forward = dying
    t0 = time.monotonic()
    try:
        eng.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
        msg = None
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"error": msg, "seconds": time.monotonic() - t0}, f)
    os._exit(0)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2-steps"])
def test_killed_rank_ends_job_with_error(ckpts, tmp_path, layout):
    import torch.multiprocessing as mp

    prompts, refs = ckpts
    timeout_s = 10
    ctx = mp.start_processes(_dying_entry, args=(2, free_port(), refs["mixtral"][0], prompts,
                                                 timeout_s, str(tmp_path), layout),
                             nprocs=2, join=False, start_method="spawn")
    t0 = time.monotonic()
    for p in ctx.processes:
        p.join(timeout=120)
    assert all(not p.is_alive() for p in ctx.processes), "a survivor hangs"
    assert ctx.processes[1].exitcode == 7
    res = tmp_path / "rank0.json"
    if res.exists():  # the survivor saw the failure and raised
        r = json.loads(res.read_text())
        assert r["error"] and "rank 0" in r["error"], r
        assert r["seconds"] < timeout_s + 5, r
    else:  # the watchdog ended it
        assert ctx.processes[0].exitcode == 3
    assert time.monotonic() - t0 < 120
