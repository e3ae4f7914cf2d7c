"""Losslessness of tree_verify_sample, statistically.

A target given by lookup tables (next-token distribution as a function of the previous token)
generates text through whole speculative loops: draft a tree, verify it with the op, append the
accepted tokens and the bonus token, repeat until L tokens exist. The distribution of the first L
tokens over many seeded trials must match plain sampling from the target (chi-square). The same
harness must reject deliberately biased verifiers, which shows the test has teeth.
"""
import math

import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref

TRIALS = 16_000  # per scenario; 8 scenarios -> 128,000 seeded trials


def chi2_sf(x: float, k: int) -> float:
    """Survival function of chi-square with k degrees of freedom (Wilson-Hilferty)."""
    z = ((x / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def table_logits(P: torch.Tensor) -> torch.Tensor:
    """Logits of a probability table (exact zeros become -inf)."""
    return torch.where(P > 0, P.log(), torch.full_like(P, float("-inf")))


def expected_sequences(P: torch.Tensor, L: int, first: int = 0) -> torch.Tensor:
    """Probability of every length-L sequence (index sum x_j V^(L-1-j)) under bigram table P."""
    V = P.shape[0]
    probs = P[first].double()
    for _ in range(L - 1):
        probs = (probs.view(-1, 1) * P.double()[torch.arange(V).repeat(probs.numel() // V)]).view(-1)
    return probs


def chi_square_pvalue(samples: torch.Tensor, P: torch.Tensor) -> float:
    B, L = samples.shape
    V = P.shape[0]
    idx = (samples * (V ** torch.arange(L - 1, -1, -1))).sum(1)
    obs = torch.bincount(idx, minlength=V ** L).double()
    exp = expected_sequences(P, L) * B
    assert obs[exp == 0].sum() == 0, "a sequence the target can never produce was generated"
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum().view(1)])
    e = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = e > 0
    o, e = o[keep], e[keep]
    assert keep.sum() >= 5, "too few cells for a meaningful test"
    stat = float(((o - e) ** 2 / e).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


# ---- drafting (vectorised over trials) -----------------------------------------------------


def random_shape(B, N, g):
    """Random recursive trees with a random size per trial (parent < child)."""
    cols = torch.arange(N).view(1, N)
    parents = (torch.rand(B, N, generator=g) * cols).floor().long()
    parents[:, 0] = -1
    num = torch.randint(1, N + 1, (B,), generator=g)
    return parents, num


def draft_random_tokens(last, V, N, g):
    """Deterministic drafts with arbitrary candidates: uniform tokens, repeats included."""
    B = last.shape[0]
    parents, num = random_shape(B, N, g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    tokens[:, 0] = last
    return parents, num, tokens, None


def draft_topk_expansion(Q, widths):
    """Deterministic drafts as a top-k expansion of a draft table: a fixed tree where a node's
    children are the most likely next tokens of its own token under Q (distinct siblings)."""
    parents, level = [-1], [0]
    for w in widths:
        nxt = []
        for p in level:
            for _ in range(w):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    order = torch.sort(Q, dim=1, descending=True, stable=True).indices
    N = len(parents)

    def draft(last, V, _N, g):
        B = last.shape[0]
        tokens = torch.empty(B, N, dtype=torch.long)
        tokens[:, 0] = last
        rank = [0] * N
        for i in range(1, N):
            rank[i] = sum(1 for j in range(1, i) if parents[j] == parents[i])
            tokens[:, i] = order[tokens[:, parents[i]], rank[i]]
        par = torch.tensor(parents).expand(B, N).contiguous()
        return par, torch.full((B,), N), tokens, None

    return draft


def draft_stochastic(Q):
    """Stochastic drafts: every child drawn i.i.d. from Q[token of its parent]."""
    def draft(last, V, N, g):
        B = last.shape[0]
        parents, num = random_shape(B, N, g)
        tokens = torch.empty(B, N, dtype=torch.long)
        tokens[:, 0] = last
        for i in range(1, N):
            q = Q[tokens.gather(1, parents[:, i:i + 1]).squeeze(1)]
            tokens[:, i] = torch.multinomial(q, 1, generator=g).squeeze(1)
        return parents, num, tokens, Q[tokens]

    return draft


# ---- the generation loop -------------------------------------------------------------------


def op_verifier(temperature=1.0, top_k=0, top_p=1.0):
    def verify(logits, tokens, parents, num, seed, offset, q):
        return ops.tree_verify_sample(logits, tokens, parents, num, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                                      draft_probs=q)
    return verify


def generate(P_logits, draft, verify, V, N, L, B, seed):
    """B independent generations of L tokens from root token 0; returns [B, L]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((B, L + N + 1), -1, dtype=torch.long)
    length = torch.zeros(B, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    seeds = torch.arange(B, dtype=torch.long) + seed * 1_000_003
    j = torch.arange(N).view(1, N)
    step = 0
    while bool((length < L).any()):
        parents, num, tokens, q = draft(last, V, N, g)
        logits = P_logits[tokens]  # the target at node i conditions on node i's token
        acc, alen, bonus = verify(logits, tokens, parents, num, seeds,
                                  torch.full((B,), step, dtype=torch.long), q)
        alen = alen.long()
        new = tokens.gather(1, acc.long().clamp_min(0))
        new = torch.cat([new[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)
        new = torch.where(j == (alen - 1).view(B, 1), bonus.long().view(B, 1), new)
        valid = j < alen.view(B, 1)
        pos = (length.view(B, 1) + j).clamp_max(L + N)
        rows = torch.arange(B).view(B, 1).expand(B, N)
        out[rows[valid], pos[valid]] = new[valid]
        length = length + alen
        last = bonus.long()
        step += 1
    return out[:, :L]


# ---- scenarios -----------------------------------------------------------------------------


def dirichlet(V, g, zeros=0):
    x = -torch.log(torch.rand(V, V, generator=g))
    if zeros:
        for r in range(V):
            x[r, torch.randperm(V, generator=g)[:zeros]] = 0.0
    return x / x.sum(1, keepdim=True)


def transformed(P, temperature, top_k, top_p):
    """The table the op samples from after temperature/top-k/top-p, row by row."""
    return torch.stack([ref.tree_target_probs(table_logits(P)[r], temperature, top_k, top_p)
                        for r in range(P.shape[0])]).double()


def _scenarios():
    g = torch.Generator().manual_seed(2024)
    V4, V3, V8 = 4, 3, 8
    P4 = dirichlet(V4, g)
    Q4 = dirichlet(V4, g)
    P3 = dirichlet(V3, g)
    P8 = dirichlet(V8, g, zeros=2)
    Q8 = dirichlet(V8, g, zeros=3)  # draft zeros where the target has mass, and vice versa
    onehot = dirichlet(V4, g)
    onehot[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # after token 1 the target is certain
    onehot[3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    Pt = dirichlet(V4, g) ** 2
    Pt = Pt / Pt.sum(1, keepdim=True)
    Pk = torch.tensor([[0.30, 0.25, 0.25, 0.20], [0.10, 0.40, 0.35, 0.15],
                       [0.45, 0.05, 0.20, 0.30], [0.20, 0.20, 0.30, 0.30]])
    # name, P, draft, V, N, L, sampling (temperature, top_k, top_p)
    return [
        ("deterministic random candidates", P3, draft_random_tokens, V3, 6, 4, (1.0, 0, 1.0)),
        ("deterministic top-k expansion", P4, draft_topk_expansion(Q4, [3, 2, 1]), V4, 0, 3, (1.0, 0, 1.0)),
        ("stochastic draft", P4, draft_stochastic(Q4), V4, 7, 3, (1.0, 0, 1.0)),
        ("stochastic draft = target", P4, draft_stochastic(P4), V4, 7, 3, (1.0, 0, 1.0)),
        ("stochastic draft with zeros, V=8", P8, draft_stochastic(Q8), V8, 6, 2, (1.0, 0, 1.0)),
        ("one-hot target rows, stochastic", onehot, draft_stochastic(Q4), V4, 6, 3, (1.0, 0, 1.0)),
        ("temperature/top-k/top-p, deterministic", Pk, draft_random_tokens, V4, 6, 3, (0.8, 3, 0.85)),
        ("temperature/top-p, stochastic", Pt, draft_stochastic(Q4), V4, 6, 3, (1.6, 0, 0.9)),
    ]


SCENARIOS = _scenarios()


@pytest.mark.parametrize("k", range(len(SCENARIOS)), ids=[s[0] for s in SCENARIOS])
def test_lossless(k):
    name, P, draft, V, N, L, (t, tk, tp) = SCENARIOS[k]
    if N == 0:  # fixed-shape drafters know their own size
        N = draft(torch.zeros(1, dtype=torch.long), V, 0, None)[0].shape[1]
    samples = generate(table_logits(P), draft, op_verifier(t, tk, tp), V, N, L, TRIALS, seed=k + 1)
    target = transformed(P, t, tk, tp)
    p = chi_square_pvalue(samples, target)
    assert p > 1e-3, f"{name}: chi-square p-value {p:.2e}"


def test_draft_equal_target_accepts_everything_it_can():
    """With q == p the first child is always accepted (min(1, p/q) == 1)."""
    g = torch.Generator().manual_seed(5)
    P = dirichlet(4, g)
    parents, num, tokens, q = draft_stochastic(P)(torch.zeros(4000, dtype=torch.long), 4, 7, g)
    out = ops.tree_verify_sample(table_logits(P)[tokens], tokens, parents, num, seed=1, draft_probs=q)
    built = ops.tree_build(parents, num)
    cur = torch.zeros(4000, dtype=torch.long)
    chain = torch.ones(4000, dtype=torch.long)
    for _ in range(7):  # follow first children
        nxt = built.first_child.gather(1, cur.view(-1, 1)).squeeze(1).long()
        chain += nxt >= 0
        cur = torch.where(nxt >= 0, nxt, cur)
    assert torch.equal(out.accept_len.long(), chain)


# ---- the test has teeth ---------------------------------------------------------------------


def biased_verifier(kind):
    """Deliberately wrong verifiers (vectorised over trials) following first children only:
    'always' accepts every draft token; 'no-residual' accepts with min(1, p/q) but on rejection
    samples from p instead of the residual max(p - q, 0)."""
    def verify(logits, tokens, parents, num, seed, offset, q):
        B, N, V = logits.shape
        g = torch.Generator().manual_seed(int(offset[0]) + 77)
        fc = ops.tree_build(parents, num).first_child.long()
        probs = torch.softmax(logits.float(), -1)
        acc = torch.full((B, N), -1, dtype=torch.int32)
        acc[:, 0] = 0
        alen = torch.ones(B, dtype=torch.int32)
        bonus = torch.full((B,), -1, dtype=torch.long)
        cur = torch.zeros(B, dtype=torch.long)
        rows = torch.arange(B)
        for _ in range(N):
            active = bonus < 0
            c = fc[rows, cur]
            p = probs[rows, cur]
            x = tokens[rows, c.clamp_min(0)]
            if kind == "always":
                ok = c >= 0
            else:
                qq = q[rows, cur]
                px, qx = p[rows, x], qq[rows, x]
                ok = (c >= 0) & (torch.rand(B, generator=g) * qx < px)
            draw = torch.multinomial(p, 1, generator=g).squeeze(1)
            stop = active & ~ok
            bonus = torch.where(stop, draw, bonus)
            move = active & ok
            acc[rows[move], alen[move].long()] = c[move].int()
            alen = alen + move.int()
            cur = torch.where(move, c, cur)
        return acc, alen, bonus

    return verify


@pytest.mark.parametrize("kind", ["always", "no-residual"])
def test_chi_square_catches_biased_verifier(kind):
    g = torch.Generator().manual_seed(99)
    P, Q = dirichlet(4, g), dirichlet(4, g)
    draft = draft_random_tokens if kind == "always" else draft_stochastic(Q)
    samples = generate(table_logits(P), draft, biased_verifier(kind), 4, 6, 3, TRIALS, seed=3)
    p = chi_square_pvalue(samples, P.double())
    assert p < 1e-6, f"the biased '{kind}' verifier passed the chi-square test (p={p:.2e})"
    # ...while the op, under the same harness and seeds, passes
    good = generate(table_logits(P), draft, op_verifier(), 4, 6, 3, TRIALS, seed=3)
    assert chi_square_pvalue(good, P.double()) > 1e-3
