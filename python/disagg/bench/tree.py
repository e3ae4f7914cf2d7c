"""Token trees: tree_build, tree_verify_greedy and tree_verify_sample vs vectorised PyTorch.

The baselines are what engines write today (Medusa/EAGLE style): argmax or softmax over the
logits of every node, then path matching over all root-to-leaf candidates. The ops only read the
rows of the nodes they visit; ``over_read`` compares each op with a gather-copy of exactly those
rows (the least any verifier must touch).
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .common import median_time, row


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--accept", type=float, default=0.8,
                        help="probability that the target favours one of a node's children")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for the ops and the baselines (0: torch's default)")


def eagle_like_tree(N: int) -> list:
    """A static draft tree of N nodes shaped like EAGLE's defaults: wide near the root, the
    best-ranked children expanded deeper (a child of sibling rank r at depth d gets
    max(0, 6 - 2r - d) children; 8 at the root), extended by a chain if the rule runs out of nodes."""
    parents, depth, rank, queue = [-1], [0], [0], [0]
    while queue and len(parents) < N:
        i = queue.pop(0)
        k = 8 if i == 0 else max(0, 6 - 2 * rank[i] - depth[i])
        for r in range(k):
            if len(parents) >= N:
                break
            parents.append(i)
            depth.append(depth[i] + 1)
            rank.append(r)
            queue.append(len(parents) - 1)
    while len(parents) < N:
        parents.append(len(parents) - 1)
    return parents


def make_inputs(B, N, V, dtype, accept, seed):
    """Logits where, at each node with children, the target puts ~80% of its mass (at T=1) on
    one child's token with probability `accept` (rank 0 child favoured), else on no child."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.tensor(eagle_like_tree(N)).expand(B, N).contiguous()
    num = torch.full((B,), N, dtype=torch.int64)
    tokens = torch.randint(0, V, (B, N), generator=g)
    logits = torch.empty(B, N, V, dtype=dtype)
    kids = [[] for _ in range(N)]
    for i in range(1, N):
        kids[int(parents[0, i])].append(i)
    bump = float(torch.log(torch.tensor(4.0 * V * 1.65)))  # ~0.8 of the softmax mass
    for b in range(B):
        x = torch.randn(N, V, generator=g)
        for i in range(N):
            if kids[i] and torch.rand(1, generator=g).item() < accept:
                r = 0 if torch.rand(1, generator=g).item() < 0.6 else int(
                    torch.randint(0, len(kids[i]), (1,), generator=g))
                x[i, tokens[b, kids[i][r]]] = bump
        logits[b] = x.to(dtype)
    return parents, num, tokens, logits


# ---- baselines: what an engine writes in vectorised PyTorch ---------------------------------


def baseline_greedy(logits, tokens, parents, paths):
    """Argmax at every node, then match every root-to-leaf path (Medusa/EAGLE)."""
    B = logits.shape[0]
    ar = torch.arange(B, device=logits.device)
    pred = logits.argmax(-1)  # [B, N]: every node's row is read
    L, D = paths.shape[1:]
    idx = paths.clamp_min(0).long().view(B, -1)
    cand = tokens.gather(1, idx).view(B, L, D)
    tgt = pred.gather(1, idx).view(B, L, D)
    match = (cand[:, :, 1:] == tgt[:, :, :-1]) & (paths[:, :, 1:] >= 0)
    acc = torch.cumprod(match.int(), -1).sum(-1)  # [B, L] accepted draft tokens per path
    best = acc.argmax(-1)
    alen = acc.gather(1, best.view(B, 1))
    path = paths[ar, best].long()
    last = path.gather(1, alen)
    return path, alen.squeeze(1) + 1, pred.gather(1, last).squeeze(1)


def baseline_sample(logits, tokens, parents, paths, sib_before, temperature):
    """Softmax at every node, then the rejection scheme for deterministic candidates evaluated
    for all nodes at once and matched along every root-to-leaf path; the bonus is drawn from the
    residual at the last accepted node."""
    B, N, V = logits.shape
    probs = torch.softmax(logits.float() / temperature, -1)  # every node's row
    dev = logits.device
    ar = torch.arange(B, device=dev)
    bidx = ar.view(B, 1)
    par = parents.clamp_min(0)
    p_tok = probs[bidx, par, tokens]  # [B, N] p_parent(token of node)
    p_tok[:, 0] = 0
    earlier = torch.bmm(sib_before, p_tok.unsqueeze(-1)).squeeze(-1)  # mass of earlier siblings
    ok = torch.rand(B, N, device=dev) * (1 - earlier).clamp_min(1e-12) < p_tok
    win = ok & ~torch.bmm(sib_before, ok.float().unsqueeze(-1)).squeeze(-1).bool()
    L, D = paths.shape[1:]
    w = win.gather(1, paths.clamp_min(0).long().view(B, -1)).view(B, L, D) & (paths >= 0)
    acc = torch.cumprod(w[:, :, 1:].int(), -1).sum(-1)
    best = acc.argmax(-1)
    alen = acc.gather(1, best.view(B, 1))
    path = paths[ar, best].long()
    last = path.gather(1, alen).squeeze(1)
    res = probs[ar, last]
    kid = (parents == last.view(B, 1)).float()  # all of the last node's children were rejected
    res = res * (torch.zeros(B, V, device=dev).scatter_add_(1, tokens, kid) == 0)
    return path, alen.squeeze(1) + 1, torch.multinomial(res, 1).squeeze(1)


def baseline_build(parents):
    """Dense [B, N, N] ancestor mask by repeated row gathers (row i := eye[i] | row of parent(i),
    iterated to the tree depth), depth as the row count, then bit packing."""
    B, N = parents.shape
    W = (N + 31) // 32
    dev = parents.device
    eye = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N)
    idx = parents.long().clamp_min(0).unsqueeze(-1).expand(B, N, N)
    mask = eye.clone()
    while True:
        nxt = eye | mask.gather(1, idx)
        if torch.equal(nxt, mask):
            break
        mask = nxt
    depth = mask.sum(-1) - 1
    bits = torch.zeros(B, N, W * 32, dtype=torch.int64, device=dev)
    bits[..., :N] = mask.long()
    packed = (bits.view(B, N, W, 32) << torch.arange(32, device=dev)).sum(-1)
    return depth, packed


def run(args) -> list:
    dev = args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # the ops' OpenMP loops follow the same setting
    dtype = getattr(torch, args.dtype)
    B, N, V = args.batch, args.nodes, args.vocab
    # inputs are drawn on the CPU (reproducible across devices), then moved
    parents, num, tokens, logits = (t.to(dev) for t in make_inputs(B, N, V, dtype, args.accept,
                                                                   args.seed))
    built = ops.tree_build(parents, num)
    paths = built.leaf_paths[:, : int(built.num_leaves.max())]
    paths = paths[:, :, : int(built.depth.max()) + 1].contiguous()
    arN = torch.arange(N, device=dev)
    sib_before = ((parents.unsqueeze(1) == parents.unsqueeze(2))
                  & (arN.view(1, 1, N) < arN.view(1, N, 1))
                  & (arN.view(1, 1, N) > 0)).float()
    temp = torch.ones(B, device=dev)
    seed = torch.arange(B, dtype=torch.int64, device=dev)
    offset = torch.zeros(B, dtype=torch.int64, device=dev)
    shape = {"B": B, "N": N, "V": V}
    flat = logits.view(B * N, V)
    elem = logits.element_size()

    def visited_read(accepted):
        """Seconds to gather-copy the rows of the visited nodes once, and their count."""
        idx = (torch.arange(B, device=dev).view(B, 1) * N + accepted.long())[accepted >= 0]
        buf = torch.empty(idx.numel(), V, dtype=dtype, device=dev)
        t = median_time(lambda: torch.index_select(flat, 0, idx, out=buf), dev, args.min_run_time)
        return t, idx.numel()

    rows = []

    greedy = ops.tree_verify_greedy(logits, tokens, parents, num)
    if args.check:
        want = reference.tree_verify_greedy(*(t.cpu() for t in (logits, tokens, parents, num)))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(greedy, want)), "tree_verify_greedy != reference"
        _, blen, bbonus = baseline_greedy(logits, tokens, parents, paths)
        assert torch.equal(blen, greedy.accept_len.long()) and torch.equal(bbonus, greedy.bonus.long()), \
            "the baseline disagrees with the op"
    t_op = median_time(lambda: ops.tree_verify_greedy(logits, tokens, parents, num), dev, args.min_run_time)
    t_base = median_time(lambda: baseline_greedy(logits, tokens, parents, paths), dev, args.min_run_time)
    t_read, nvis = visited_read(greedy.accepted)
    rows.append(row(op="tree_verify_greedy", device=dev, shape=shape, dtype=dtype, median_s=t_op,
                    baseline="argmax all nodes + leaf-path match", baseline_median_s=t_base,
                    nbytes=nvis * V * elem, mean_accept_len=float(greedy.accept_len.float().mean()),
                    visited_rows=nvis, visited_read_s=t_read, over_read=t_op / t_read))

    for label, tk, tp in (("T=1", 0, 1.0), ("T=1,top_k=50,top_p=0.9", 50, 0.9)):
        kw = dict(temperature=temp, top_k=tk, top_p=tp, seed=seed, offset=offset)
        out = ops.tree_verify_sample(logits, tokens, parents, num, **kw)
        if args.check:
            cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
            # on a GPU the CPU op (tested against the reference) keeps the check within seconds
            check = reference.tree_verify_sample if dev.type == "cpu" else ops.tree_verify_sample
            want = check(*(t.cpu() for t in (logits, tokens, parents, num)), **cpu_kw)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(out, want)), "tree_verify_sample != reference"
        t_op = median_time(lambda: ops.tree_verify_sample(logits, tokens, parents, num, **kw), dev,
                           args.min_run_time)
        if tk == 0 and tp == 1.0:
            base, bname = (lambda: baseline_sample(logits, tokens, parents, paths, sib_before, temp.view(B, 1, 1))), \
                "softmax all nodes + leaf-path rejection"
        else:
            def base():
                # top-k over every node first (what a fused engine sampler does), then as above
                vals, ids = torch.topk(logits.float(), tk, dim=-1)
                probs = torch.softmax(vals, -1)
                sp, si = torch.sort(probs, -1, descending=True)
                keep = (sp.cumsum(-1) - sp) < tp
                filt = torch.full_like(logits, float("-inf"), dtype=torch.float32)
                filt.scatter_(-1, ids.gather(-1, si), torch.where(keep, sp.log(), float("-inf")))
                return baseline_sample(filt, tokens, parents, paths, sib_before, 1.0)
            bname = "top-k/top-p + softmax all nodes + leaf-path rejection"
        t_base = median_time(base, dev, args.min_run_time)
        t_read, nvis = visited_read(out.accepted)
        rows.append(row(op=f"tree_verify_sample[{label}]", device=dev, shape=shape, dtype=dtype,
                        median_s=t_op, baseline=bname, baseline_median_s=t_base,
                        nbytes=nvis * V * elem, mean_accept_len=float(out.accept_len.float().mean()),
                        visited_rows=nvis, visited_read_s=t_read, over_read=t_op / t_read))

    if args.check:
        want = reference.tree_build(parents[:4].cpu(), num[:4].cpu())
        got = ops.tree_build(parents[:4], num[:4])
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), "tree_build != reference"
    t_op = median_time(lambda: ops.tree_build(parents, num), dev, args.min_run_time)
    t_base = median_time(lambda: baseline_build(parents), dev, args.min_run_time)
    rows.append(row(op="tree_build", device=dev, shape={"B": B, "N": N}, dtype=torch.int32,
                    median_s=t_op, baseline="dense [B,N,N] mask by row gathers + packing",
                    baseline_median_s=t_base))
    return rows
