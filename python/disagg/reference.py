"""Pure-PyTorch references for every disagg op: slow, obvious, and what the tests compare to."""
from __future__ import annotations

from typing import Optional

import torch

from .ops import MoELayout, RouteOutput, route_capacity

# ---- MoE routing ---------------------------------------------------------------------------


def _rank_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim descending, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def route_scores(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """Router scores in float32 with the NaN/inf rules of ``disagg.ops.route``."""
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    mx = x.max(dim=-1, keepdim=True).values if x.shape[-1] else x
    pos_inf = torch.isposinf(mx)
    all_neg = torch.isneginf(mx)
    safe = torch.where(pos_inf | all_neg, torch.zeros_like(mx), mx)
    e = torch.exp(torch.where(torch.isinf(x) & (pos_inf | all_neg), torch.zeros_like(x), x) - safe)
    s = e / e.sum(dim=-1, keepdim=True)
    inf_share = torch.isposinf(x).float()
    inf_share = inf_share / inf_share.sum(dim=-1, keepdim=True).clamp_min(1)
    s = torch.where(pos_inf, inf_share, s)
    return torch.where(all_neg, torch.zeros_like(s), s)


def _selection(scores, bias, num_groups, topk_groups, group_score):
    sel = scores + (bias.float() if bias is not None else 0.0)
    if num_groups > 1 and topk_groups < num_groups:
        T, E = sel.shape
        g = sel.view(T, num_groups, E // num_groups)
        if group_score == "max" or g.shape[-1] < 2:
            gs = g.max(dim=-1).values
        else:
            gs = torch.sort(g, dim=-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros(T, num_groups, dtype=torch.bool)
        keep.scatter_(1, _rank_desc(gs)[:, :topk_groups], True)
        sel = torch.where(keep.repeat_interleave(E // num_groups, dim=1), sel,
                          torch.full_like(sel, float("-inf")))
    return sel


def route(logits: torch.Tensor, top_k: int, *, scoring="softmax", bias=None, num_groups=1,
          topk_groups=1, group_score="max", renormalize=True, routed_scaling_factor=1.0,
          capacity_factor=0.0, drop_policy="position", overflow="drop") -> RouteOutput:
    """Reference for ``disagg.ops.route`` (same semantics, written for clarity)."""
    T, E = logits.shape
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    scores = route_scores(logits, scoring)
    grouped = num_groups > 1 and topk_groups < num_groups
    # Without bias or groups the logits rank the experts (scores are monotone in them).
    sel = x if (bias is None and not grouped) else _selection(scores, bias, num_groups, topk_groups,
                                                               group_score)
    order = _rank_desc(sel)
    ids = order[:, :top_k].clone()
    w = torch.gather(scores, 1, ids)
    denom = w.sum(dim=1, keepdim=True)
    denom = torch.where((denom > 0) & torch.tensor(renormalize), denom, torch.ones_like(denom))
    w = w / denom * routed_scaling_factor
    C = route_capacity(capacity_factor, T, top_k, E)
    A = T * top_k
    # The capacity pass is sequential by nature; plain lists keep it readable and quick.
    flat_ids = ids.reshape(-1).tolist()
    flat_w = w.reshape(-1).tolist()
    slots = [-1] * A
    counts = [0] * E
    if C == 0:
        keep, dropped = [True] * A, []
    elif drop_policy == "position":
        keep, seen = [False] * A, [0] * E
        for a in range(A):
            e = flat_ids[a]
            if seen[e] < C:
                keep[a] = True
                seen[e] += 1
        dropped = [a for a in range(A) if not keep[a]]
    else:
        keep = [False] * A
        members = [[] for _ in range(E)]
        for a in range(A):
            members[flat_ids[a]].append(a)
        for e in range(E):
            for a in sorted(members[e], key=lambda a: (-flat_w[a], a))[:C]:
                keep[a] = True
        dropped = sorted((a for a in range(A) if not keep[a]), key=lambda a: (-flat_w[a], a))
    for a in range(A):
        if keep[a]:
            slots[a] = counts[flat_ids[a]]
            counts[flat_ids[a]] += 1
    if overflow == "reroute" and dropped:
        order_l, sel_l, scores_l, denom_l = order.tolist(), sel.tolist(), scores.tolist(), denom.view(-1).tolist()
        for a in dropped:
            t = a // top_k
            held = set(flat_ids[t * top_k:(t + 1) * top_k])
            for e in order_l[t]:
                if grouped and sel_l[t][e] == float("-inf"):
                    break  # the rest lie outside the chosen groups
                if counts[e] < C and e not in held:
                    flat_ids[a] = e
                    slots[a] = counts[e]
                    counts[e] += 1
                    flat_w[a] = scores_l[t][e] / denom_l[t] * routed_scaling_factor
                    break
    for a in dropped:
        if slots[a] < 0:
            flat_ids[a] = -1
            flat_w[a] = 0.0
    shape = (T, top_k)
    return RouteOutput(
        torch.tensor(flat_w, dtype=torch.float32).view(shape),
        torch.tensor(flat_ids, dtype=torch.int32).view(shape),
        torch.tensor(slots, dtype=torch.int32).view(shape),
        torch.tensor(counts, dtype=torch.int32),
    )


def moe_layout(ids: torch.Tensor, num_experts: int, *, ep_size: int = 1, capacity: int = 0,
               slots: Optional[torch.Tensor] = None) -> MoELayout:
    """Reference for ``disagg.ops.moe_layout``."""
    flat = ids.reshape(-1).long()
    A = flat.numel()
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=num_experts)
    if capacity > 0:
        eoff = torch.arange(num_experts + 1) * capacity
        dest = torch.where(valid, flat * capacity + slots.reshape(-1).long(), -1)
        rows = num_experts * capacity
    else:
        eoff = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # stable sort by expert keeps token order inside an expert
        key = torch.where(valid, flat, num_experts)
        order = torch.sort(key, stable=True).indices
        dest = torch.full((A,), -1, dtype=torch.long)
        n = int(valid.sum())
        dest[order[:n]] = torch.arange(n)
        rows = A
    src = torch.full((rows,), -1, dtype=torch.long)
    src[dest[valid]] = torch.arange(A)[valid]
    roff = eoff[[(r * num_experts) // ep_size for r in range(ep_size + 1)]]
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return MoELayout(i32(dest), i32(src), i32(eoff), i32(roff))


def moe_permute(x: torch.Tensor, src: torch.Tensor, top_k: int) -> torch.Tensor:
    """Reference for ``disagg.ops.moe_permute``."""
    s = src.long()
    out = x[(s.clamp_min(0) // top_k)].clone()
    out[s < 0] = 0
    return out


def moe_combine(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference for ``disagg.ops.moe_combine`` (float32 accumulation)."""
    T, k = weights.shape
    d = dest.reshape(T, k).long()
    rows = y.float()[d.clamp_min(0)]  # [T, k, H]
    w = torch.where(d >= 0, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    return (rows * w.unsqueeze(-1)).sum(1).to(out_dtype or y.dtype)


def moe_combine_into(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """Reference for ``disagg.ops.moe_combine_into``: :func:`moe_combine` copied into ``out``."""
    return out.copy_(moe_combine(y, dest, weights, out_dtype=out.dtype))


# ---- Paged KV cache ------------------------------------------------------------------------

_KV_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def _fp8_pow2_scale(amax):
    """fp8 scales: 2^k with the smallest k such that amax * 2^-k <= 448, k >= -126 (0 for an
    all-zero group); returns (scale, inv) as float32, both exact powers of two."""
    m, e = torch.frexp(amax.double())  # amax = m * 2^e, m in [0.5, 1); 448 = 0.875 * 2^9
    k = (e - 9 + (m > 0.875).to(e.dtype)).clamp(min=-126)
    two = torch.full_like(amax, 2.0, dtype=torch.float64)
    pos = amax > 0
    scale = torch.where(pos, torch.pow(two, k.double()), 0.0).float()
    inv = torch.where(pos, torch.pow(two, -k.double()), 0.0).float()
    return scale, inv


def _kv_nhd(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """An NHD view ``[blocks, 2, block_size, heads, dim]`` of a cache in either layout."""
    return cache.transpose(2, 3) if layout == "HND" else cache


def kv_pack(caches, block_table, num_tokens, *, layer_start=0, layer_end=-1, head_start=0,
            head_end=-1, quant="none", layout="NHD") -> torch.Tensor:
    """Reference of ``disagg.ops.kv_pack``: gather blocks, slice, quantize, serialise."""
    import struct

    from .ops import _KV_DTYPES, _KV_HEADER, _KV_MAGIC, KV_QUANTS, kv_pack_nbytes

    layer_end = len(caches) if layer_end < 0 else layer_end
    views = [_kv_nhd(c, layout) for c in caches[layer_start:layer_end]]
    c0 = _kv_nhd(caches[0], layout)
    _, _, bs, H, D = c0.shape
    head_end = H if head_end < 0 else head_end
    L, Hc, T = layer_end - layer_start, head_end - head_start, num_tokens
    nblk = -(-T // bs)
    table = block_table[:nblk].long()
    # [L, 2, nblk * bs, Hc, D]: tokens in block-table order, the tail of the last block dropped
    x = torch.stack([v[table].transpose(0, 1).reshape(2, nblk * bs, H, D) for v in views]) \
        if L else c0.new_empty((0, 2, nblk * bs, H, D))
    x = x[:, :, :, head_start:head_end]
    total = kv_pack_nbytes(L, T, Hc, D, c0.dtype, quant, bs)
    out = torch.zeros(total, dtype=torch.uint8)
    hdr = struct.pack(_KV_HEADER, _KV_MAGIC, 1, 64, _KV_DTYPES.index(c0.dtype),
                      KV_QUANTS.index(quant), c0.dtype.itemsize if quant == "none" else 1, 0,
                      L, T, Hc, D, 0 if quant == "none" else bs, layer_start, head_start, 64,
                      (64 + L * 2 * T * Hc * D * (c0.dtype.itemsize if quant == "none" else 1)
                       + 15) // 16 * 16, total)
    out[:64] = torch.frombuffer(bytearray(hdr), dtype=torch.uint8)
    if quant == "none":
        payload = x[:, :, :T].contiguous().view(torch.uint8).reshape(-1)
        out[64:64 + payload.numel()] = payload
        return out
    qmax = _KV_QMAX[quant]
    g = x.float()
    g[:, :, T:] = 0  # the last block's unused slots take no part in its scale
    g = g.reshape(L, 2, nblk, bs, Hc, D)
    amax = g.abs().amax(dim=(3, 5))  # [L, 2, nblk, Hc]
    if not torch.isfinite(amax).all():
        raise ValueError("disagg.kv_pack: caches hold inf or NaN; quantized packing needs finite values")
    pos = amax > 0
    if quant == "int8":
        # tensor / tensor is a true IEEE division; `qmax / amax` would be reciprocal-then-multiply
        q_t = torch.full_like(amax, qmax)
        scale = torch.where(pos, amax / q_t, torch.zeros_like(amax))
        inv = torch.where(pos, q_t / amax, torch.zeros_like(amax))
    else:
        scale, inv = _fp8_pow2_scale(amax)
    y = g * inv[:, :, :, None, :, None]
    if quant == "int8":
        q = torch.round(y).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        q = y.to(torch.float8_e4m3fn).view(torch.uint8)
    q = q.reshape(L, 2, nblk * bs, Hc, D)[:, :, :T].reshape(-1)
    out[64:64 + q.numel()] = q
    s = scale.contiguous().view(torch.uint8).reshape(-1)
    start = (64 + q.numel() + 15) // 16 * 16
    out[start:start + s.numel()] = s
    return out


def kv_unpack(buffer, caches, block_table, *, layer_start=0, head_start=0, layout="NHD") -> None:
    """Reference of ``disagg.ops.kv_unpack``: parse, dequantize, convert, scatter."""
    from .ops import kv_buffer_info

    info = kv_buffer_info(buffer)
    L, T, Hc, D = info.num_layers, info.num_tokens, info.num_heads, info.head_dim
    n = L * 2 * T * Hc * D
    if info.quant == "none":
        nbytes = n * info.dtype.itemsize
        x = buffer[64:64 + nbytes].clone().view(info.dtype).reshape(L, 2, T, Hc, D).float()
    else:
        q = buffer[64:64 + n].clone()
        xq = (q.view(torch.int8) if info.quant == "int8" else q.view(torch.float8_e4m3fn)).float()
        xq = xq.reshape(L, 2, T, Hc, D)
        ng = -(-T // info.scale_group)
        s0 = (64 + n + 15) // 16 * 16
        scale = buffer[s0:s0 + L * 2 * ng * Hc * 4].clone().view(torch.float32).reshape(L, 2, ng, Hc)
        tok_scale = scale[:, :, torch.arange(T) // info.scale_group]  # [L, 2, T, Hc]
        x = xq * tok_scale[..., None]
    bs = _kv_nhd(caches[0], layout).shape[2]
    pos = torch.arange(T)
    blk = block_table[: -(-T // bs)].long()[pos // bs]
    off = pos % bs
    for i in range(L):
        v = _kv_nhd(caches[layer_start + i], layout)
        v[blk, :, off, head_start:head_start + Hc] = x[i].transpose(0, 1).to(v.dtype)


def kv_compact(caches, block_table, src_positions, dst_start, *, layout="NHD") -> None:
    """Reference of ``disagg.ops.kv_compact``: gather every source first, then scatter."""
    src = src_positions.long()
    n = src.numel()
    if n == 0:
        return
    bs = _kv_nhd(caches[0], layout).shape[2]
    table = block_table.long()
    dst = torch.arange(dst_start, dst_start + n)
    for c in caches:
        v = _kv_nhd(c, layout)
        vals = v[table[src // bs], :, src % bs].clone()  # [n, 2, H, D]
        v[table[dst // bs], :, dst % bs] = vals

# ---- Token trees ---------------------------------------------------------------------------

from .ops import TreeBuildOutput, TreeVerifyOutput  # noqa: E402

_M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 block (four 32-bit words) for a 4-word counter and 2-word key."""
    c0, c1, c2, c3 = (int(c) & _M32 for c in counter)
    k0, k1 = (int(k) & _M32 for k in key)
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offset: int, draw: int) -> float:
    """Draw ``draw`` of stream (seed, offset) as a double in [0, 1), as the kernels compute it."""
    s, o = int(seed) % 2**64, int(offset) % 2**64
    r = philox4x32_10((o & _M32, o >> 32, draw, 0), (s & _M32, s >> 32))
    return (((r[0] >> 5) << 26) | (r[1] >> 6)) * 2.0**-53


def _check_tree(parents, num_nodes):
    B, N = parents.shape
    for b in range(B):
        n = int(num_nodes[b])
        if not 1 <= n <= N:
            raise ValueError(f"num_nodes[{b}] = {n} must be in [1, N={N}]")
        if int(parents[b, 0]) != -1:
            raise ValueError(f"parents[{b}, 0] must be -1")
        for i in range(1, n):
            if not 0 <= int(parents[b, i]) < i:
                raise ValueError(f"parents is not a tree at [{b}, {i}]")


def _children(par, n):
    kids = [[] for _ in range(n)]
    for i in range(1, n):
        kids[par[i]].append(i)
    return kids


def tree_build(parents: torch.Tensor, num_nodes: Optional[torch.Tensor] = None, *,
               max_depth: int = -1) -> TreeBuildOutput:
    """Reference for ``disagg.ops.tree_build``."""
    B, N = parents.shape
    if num_nodes is None:
        num_nodes = torch.full((B,), N)
    _check_tree(parents, num_nodes)
    D = N if max_depth < 0 else max_depth + 1
    W = (N + 31) // 32
    depth = torch.full((B, N), -1, dtype=torch.int32)
    mask = torch.zeros((B, N, W * 32), dtype=torch.bool)
    fc = torch.full((B, N), -1, dtype=torch.int32)
    ns = torch.full((B, N), -1, dtype=torch.int32)
    paths = torch.full((B, N, D), -1, dtype=torch.int32)
    leaves = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        n = int(num_nodes[b])
        par = parents[b].tolist()
        kids = _children(par, n)
        for i in range(n):
            chain = [i]
            while par[chain[-1]] >= 0:
                chain.append(par[chain[-1]])
            depth[b, i] = len(chain) - 1
            mask[b, i, chain] = True
            if kids[i]:
                fc[b, i] = kids[i][0]
            for a, c in zip(kids[i], kids[i][1:]):
                ns[b, a] = c
            if not kids[i]:
                if len(chain) > D:
                    raise ValueError(f"depth {len(chain) - 1} exceeds max_depth")
                paths[b, int(leaves[b]), :len(chain)] = torch.tensor(chain[::-1], dtype=torch.int32)
                leaves[b] += 1
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (mask.view(B, N, W, 32).long() * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return TreeBuildOutput(depth, packed, fc, ns, paths, leaves)


def _argmax(row: torch.Tensor) -> int:
    """Lowest id holding the maximum, NaN counting as -inf (nothing above -inf: token 0)."""
    x = row.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    return int(torch.nonzero(x == x.max())[0])


def _greedy_walk(choice, tok, kids):
    path, cur = [0], 0
    while True:
        want = choice(cur)
        nxt = next((c for c in kids[cur] if tok[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        cur = nxt


def _pack_verify(results, B, N) -> TreeVerifyOutput:
    accepted = torch.full((B, N), -1, dtype=torch.int32)
    lens = torch.zeros(B, dtype=torch.int32)
    bonus = torch.zeros(B, dtype=torch.int32)
    for b, (path, bon) in enumerate(results):
        accepted[b, :len(path)] = torch.tensor(path, dtype=torch.int32)
        lens[b] = len(path)
        bonus[b] = bon
    return TreeVerifyOutput(accepted, lens, bonus)


def tree_verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                       num_nodes: Optional[torch.Tensor] = None) -> TreeVerifyOutput:
    """Reference for ``disagg.ops.tree_verify_greedy`` (a plain walk, one request at a time)."""
    B, N = parents.shape
    if num_nodes is None:
        num_nodes = torch.full((B,), N)
    _check_tree(parents, num_nodes)
    ids = logits.dim() == 2
    results = []
    for b in range(B):
        kids = _children(parents[b].tolist(), int(num_nodes[b]))
        choice = (lambda i: int(logits[b, i])) if ids else (lambda i: _argmax(logits[b, i]))
        results.append(_greedy_walk(choice, tokens[b].tolist(), kids))
    return _pack_verify(results, B, N)


def tree_target_probs(row: torch.Tensor, temperature: float, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """The target's sampling distribution at one node, float32 [V], with the op's rules:
    logits / temperature -> top-k (ties to the lower id) -> softmax -> top-p -> renormalise."""
    V = row.shape[0]
    x = row.float() / torch.tensor(temperature, dtype=torch.float32)
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    m = x.max()
    if torch.isposinf(m):
        p = (x == m).float()
        return p / p.sum()
    if torch.isneginf(m):
        p = torch.zeros(V)
        p[_argmax(row)] = 1.0
        return p
    if 0 < top_k < V:
        order = torch.sort(x, descending=True, stable=True).indices
        x = x.clone()
        x[order[top_k:]] = float("-inf")
    p = torch.exp(x - m)
    if top_p < 1.0:
        order = torch.sort(p, descending=True, stable=True).indices
        sp = p[order].double()
        excl = torch.cumsum(sp, 0) - sp
        drop = order[(excl >= top_p * sp.sum()) & (sp > 0)]
        p[drop] = 0.0
    return p * (1.0 / p.sum())


def _sample_from(p: torch.Tensor, u: float) -> int:
    pd = p.double()
    total = float(pd.sum())
    if not total > 0:
        return _argmax(p)
    cum = torch.cumsum(pd, 0)
    hit = torch.nonzero((cum > u * total) & (p > 0))
    if hit.numel():
        return int(hit[0])
    return int(torch.nonzero(p > 0)[-1])


def tree_verify_sample(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                       num_nodes: Optional[torch.Tensor] = None, *, temperature=1.0, top_k=0,
                       top_p=1.0, seed=0, offset=0,
                       draft_probs: Optional[torch.Tensor] = None) -> TreeVerifyOutput:
    """Reference for ``disagg.ops.tree_verify_sample``: the same walk, draws and rules, one
    request at a time, in plain PyTorch (float32 probabilities, float64 running sums)."""
    B, N = parents.shape
    if num_nodes is None:
        num_nodes = torch.full((B,), N)
    _check_tree(parents, num_nodes)
    per = lambda x: x.tolist() if isinstance(x, torch.Tensor) else [x] * B  # noqa: E731
    temps, tks, tps, seeds, offs = map(per, (temperature, top_k, top_p, seed, offset))
    results = []
    for b in range(B):
        tok = tokens[b].tolist()
        kids = _children(parents[b].tolist(), int(num_nodes[b]))
        T = float(torch.tensor(temps[b], dtype=torch.float32))
        if T == 0.0:
            results.append(_greedy_walk(lambda i: _argmax(logits[b, i]), tok, kids))
            continue
        tp = float(torch.tensor(tps[b], dtype=torch.float32))
        draw = 0
        path, cur = [0], 0
        while True:
            p = tree_target_probs(logits[b, cur], T, int(tks[b]), tp)
            nxt = None
            q = draft_probs[b, cur].float() if draft_probs is not None else None
            remaining = 1.0
            for c in kids[cur]:
                u = philox_uniform(seeds[b], offs[b], draw)
                draw += 1
                x = tok[c]
                px = float(p[x])
                if q is None:
                    if px > 0 and u * remaining < px:
                        nxt = c
                        break
                    remaining = max(0.0, remaining - px)
                    p[x] = 0.0
                else:
                    qx = float(q[x])
                    if (u * qx < px) if qx > 0 else (px > 0):
                        nxt = c
                        break
                    r = torch.clamp(p - q, min=0.0)
                    rs = r.sum()
                    if rs > 0:
                        p = r * (1.0 / rs)
            if nxt is None:
                bonus = _sample_from(p, philox_uniform(seeds[b], offs[b], draw))
                results.append((path, bonus))
                break
            path.append(nxt)
            cur = nxt
    return _pack_verify(results, B, N)

# ---- Attention -----------------------------------------------------------------------------


def paged_decode_attention(q, kv_cache, block_tables, ctx_lens, scale, sliding_window=0):
    """Gather each sequence's pages, then plain softmax attention in float32."""
    B, Hq, D = q.shape
    bs, Hkv = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    for b in range(B):
        L = int(ctx_lens[b])
        blocks = block_tables[b, : (L + bs - 1) // bs].long()
        k = kv_cache[blocks, 0].reshape(-1, Hkv, D)[:L].float()
        v = kv_cache[blocks, 1].reshape(-1, Hkv, D)[:L].float()
        start = max(0, L - sliding_window) if sliding_window > 0 else 0
        k, v = k[start:], v[start:]
        G = Hq // Hkv
        k = k.repeat_interleave(G, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float() * scale, k)
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out

# ---- Tree attention (speculative decoding) ---------------------------------------------------


def paged_tree_attention(q, kv_cache, block_tables, ctx_lens, tree_lens, q_offsets, tree_mask,
                         scale, sliding_window=0):
    """Gather each sequence's pages, unpack the tree mask, dense masked softmax in float32."""
    T, Hq, D = q.shape
    bs, Hkv = kv_cache.shape[2], kv_cache.shape[3]
    G = Hq // Hkv
    out = torch.empty_like(q)
    W = tree_mask.shape[1]
    for b in range(block_tables.shape[0]):
        c, n = int(ctx_lens[b]), int(tree_lens[b])
        q0, q1 = int(q_offsets[b]), int(q_offsets[b + 1])
        if q1 == q0:
            continue
        L = c + n
        blocks = block_tables[b, : (L + bs - 1) // bs].long()
        k = kv_cache[blocks, 0].reshape(-1, Hkv, D)[:L].float().repeat_interleave(G, dim=1)
        v = kv_cache[blocks, 1].reshape(-1, Hkv, D)[:L].float().repeat_interleave(G, dim=1)
        words = tree_mask[q0:q1].long() & 0xFFFFFFFF
        bits = ((words[:, :, None] >> torch.arange(32)) & 1).bool().reshape(q1 - q0, 32 * W)
        tree = bits[:, :n]
        vis = torch.cat([torch.ones(q1 - q0, c, dtype=torch.bool), tree], 1)
        if sliding_window > 0:
            depth = tree.long().cumsum(1) - 1  # k-th set bit sits at position ctx + k
            qpos = c + tree.sum(1) - 1
            kpos = torch.cat([torch.arange(c)[None].expand(q1 - q0, c), c + depth], 1)
            vis &= kpos > (qpos[:, None] - sliding_window)
        s = torch.einsum("thd,nhd->thn", q[q0:q1].float() * scale, k)
        s = s.masked_fill(~vis[:, None, :], float("-inf"))
        out[q0:q1] = torch.einsum("thn,nhd->thd", s.softmax(-1), v).to(q.dtype)
    return out

# ---- Expert FFN ----------------------------------------------------------------------------


def expert_gemm(x, w, expert_offsets):
    """One float32 matmul per expert segment; rows outside the segments are zero."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    o = [int(v) for v in expert_offsets]
    for e in range(w.shape[0]):
        out[o[e]:o[e + 1]] = x[o[e]:o[e + 1]].float() @ w[e].float().t()
    return out.to(x.dtype)

# ---- Model layers (decode hot path) ---------------------------------------------------------


def moe_experts(x, ids, weights, w13, w2):
    """Each assignment's SiLU-gated MLP in float32, summed per token in k order."""
    T, H = x.shape
    inter = w2.shape[2]
    xf = x.float()
    out = torch.zeros(T, H, dtype=torch.float32)
    for j in range(ids.shape[1]):
        for t in range(T):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = w13[e].float() @ xf[t]
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(weights[t, j]) * (w2[e].float() @ a)
    return out.to(x.dtype)


def moe_experts_packed(x, ids, weights, w13p, w2p, inter):
    """:func:`moe_experts` on the weights :func:`disagg.ops.unpack_moe_weights` recovers."""
    from .ops import unpack_moe_weights

    w13, w2 = unpack_moe_weights(w13p, w2p, x.shape[1], inter)
    return moe_experts(x, ids, weights, w13, w2)


def rms_norm(x, weight, eps):
    """HF's RMSNorm: float32 statistics, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(residual, x, weight, eps):
    """``residual += x`` (in place), then ``rms_norm(residual)``."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


def paged_decode_attention_rope(qkv, cos, sin, kv_cache, block_tables, ctx_lens, num_heads,
                                scale, sliding_window=0):
    """RoPE on q and k (float32, rounded to qkv's dtype), K/V written at position
    ``ctx_len - 1`` of each block table, then :func:`paged_decode_attention`."""
    B = qkv.shape[0]
    bs, hkv, d = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    x = qkv.view(B, num_heads + 2 * hkv, d)
    xf, c, s = x.float(), cos.float()[:, None, :], sin.float()[:, None, :]
    rot = torch.cat((-xf[..., d // 2:], xf[..., :d // 2]), -1)
    qk = (xf * c + rot * s).to(qkv.dtype)
    for b in range(B):
        p = int(ctx_lens[b]) - 1
        blk = int(block_tables[b, p // bs])
        kv_cache[blk, 0, p % bs] = qk[b, num_heads:num_heads + hkv]
        kv_cache[blk, 1, p % bs] = x[b, num_heads + hkv:]
    return paged_decode_attention(qk[:, :num_heads].contiguous(), kv_cache, block_tables,
                                  ctx_lens, scale, sliding_window)


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` in float32, rounded to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
