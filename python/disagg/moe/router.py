"""``MoERouter``: the chapter's router API, doing the routing with ``disagg.ops.route``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import ops
from ..reference import route_scores  # metrics need full-row probabilities


@dataclass
class _Tally:
    """Running totals over everything routed since the last reset."""

    tokens: int = 0
    assignments: int = 0
    dropped: int = 0
    rerouted: int = 0
    loads: Optional[torch.Tensor] = None  # [E] kept assignments per expert
    demand: Optional[torch.Tensor] = None  # [E] top-k choices per expert before capacity
    prob_sum: Optional[torch.Tensor] = None  # [E] summed router probabilities
    z_sum: float = 0.0
    calls: int = 0
    capacities: List[int] = field(default_factory=list)


class MoERouter:
    """Top-k Mixture-of-Experts router with capacity, drop/reroute policies and load metrics.

    Parameters
    ----------
    num_experts, top_k : int
    capacity_factor : float
        Capacity per expert per call is ``ceil(capacity_factor * T * top_k / E)``; ``<= 0``
        routes without drops.
    hidden_size : int
        Width of the hidden states the gate scores (and of the token embeddings used when
        token ids are routed).
    vocab_size : int
        Size of the embedding table used to score token ids.
    scoring, drop_policy, overflow, num_groups, topk_groups, group_score, renormalize,
    routed_scaling_factor :
        Passed to :func:`disagg.ops.route`.
    bias_update_rate : float
        When > 0, aux-loss-free balancing: after each call the selection bias of every expert
        moves by this rate towards balance (up when under-loaded, down when over-loaded).
    seed : int
        Seed of the random gate and embeddings.

    Examples
    --------
    >>> router = MoERouter(num_experts=8, top_k=2, capacity_factor=1.2)
    >>> assignments = router.route_tokens(list(range(100)))   # expert -> token positions
    >>> sum(len(v) for v in assignments.values()) <= 8 * router.last_capacity
    True
    >>> router.get_load_balance_metrics()["dropped"] >= 0
    True
    """

    def __init__(self, num_experts: int = 8, top_k: int = 2, capacity_factor: float = 1.25, *,
                 hidden_size: int = 64, vocab_size: int = 32000, scoring: str = "softmax",
                 drop_policy: str = "position", overflow: str = "drop", num_groups: int = 1,
                 topk_groups: int = 1, group_score: str = "max", renormalize: bool = True,
                 routed_scaling_factor: float = 1.0, bias_update_rate: float = 0.0,
                 seed: int = 0):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if hidden_size < 1 or vocab_size < 1:
            raise ValueError("hidden_size and vocab_size must be >= 1")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = float(capacity_factor)
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.route_kwargs = dict(scoring=scoring, drop_policy=drop_policy, overflow=overflow,
                                 num_groups=num_groups, topk_groups=topk_groups,
                                 group_score=group_score, renormalize=renormalize,
                                 routed_scaling_factor=routed_scaling_factor)
        self.bias_update_rate = float(bias_update_rate)
        self.bias = torch.zeros(num_experts) if bias_update_rate > 0 else None
        g = torch.Generator().manual_seed(seed)
        self.gate = torch.randn(hidden_size, num_experts, generator=g) / hidden_size ** 0.5
        self._embed_seed = seed
        self._embedding: Optional[torch.Tensor] = None
        self.last_capacity = 0
        self.reset_metrics()

    # ---- routing ---------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embedding is None:  # built on first use: token-id routing is optional
            g = torch.Generator().manual_seed(self._embed_seed + 1)
            self._embedding = torch.randn(self.vocab_size, self.hidden_size, generator=g)
        return self._embedding[ids]

    def _logits(self, tokens, hidden_states, logits) -> torch.Tensor:
        given = [v is not None for v in (tokens, hidden_states, logits)]
        if sum(given) != 1:
            raise ValueError("route_tokens takes exactly one of tokens, hidden_states, logits")
        if logits is not None:
            logits = torch.as_tensor(logits)
            if logits.dim() != 2 or logits.shape[1] != self.num_experts:
                raise ValueError(f"logits must be [T, num_experts={self.num_experts}], "
                                 f"got {tuple(logits.shape)}")
            return logits
        if hidden_states is not None:
            h = torch.as_tensor(hidden_states)
            if h.dim() != 2 or h.shape[1] != self.hidden_size:
                raise ValueError(f"hidden_states must be [T, hidden_size={self.hidden_size}], "
                                 f"got {tuple(h.shape)}")
            return h.float() @ self.gate
        ids = torch.as_tensor(tokens)
        if ids.is_floating_point():
            # a float matrix given positionally: hidden states or logits, by width
            if ids.dim() == 2 and ids.shape[1] == self.hidden_size:
                return self._logits(None, ids, None)
            return self._logits(None, None, ids)
        ids = ids.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"tokens must be ids in [0, vocab_size={self.vocab_size})")
        return self._embed(ids) @ self.gate

    def route(self, tokens=None, *, hidden_states=None, logits=None) -> ops.RouteOutput:
        """Route and return the raw :class:`disagg.ops.RouteOutput` (weights, ids, slots,
        counts); updates the metrics."""
        x = self._logits(tokens, hidden_states, logits)
        out = ops.route(x, self.top_k, bias=self.bias, capacity_factor=self.capacity_factor,
                        **self.route_kwargs)
        self._record(x, out)
        return out

    def route_tokens(self, tokens: Union[Sequence[int], torch.Tensor, None] = None, *,
                     hidden_states: Optional[torch.Tensor] = None,
                     logits: Optional[torch.Tensor] = None) -> Dict[int, List[int]]:
        """Route a batch and return ``{expert: [token positions]}`` with capacity enforced.

        ``tokens`` are token ids (scored through the router's embedding and gate), or a float
        ``[T, hidden_size]`` / ``[T, num_experts]`` matrix; or pass ``hidden_states=`` or
        ``logits=`` explicitly. Every expert appears as a key, in slot order.
        """
        out = self.route(tokens, hidden_states=hidden_states, logits=logits)
        assignments: Dict[int, List[int]] = {e: [] for e in range(self.num_experts)}
        ids, slots = out.ids.tolist(), out.slots.tolist()
        per_expert: Dict[int, List[tuple]] = {e: [] for e in range(self.num_experts)}
        for t, (row, srow) in enumerate(zip(ids, slots)):
            for e, s in zip(row, srow):
                if e >= 0:
                    per_expert[e].append((s, t))
        for e, lst in per_expert.items():
            assignments[e] = [t for _, t in sorted(lst)]
        return assignments

    # ---- metrics ---------------------------------------------------------------------------

    def reset_metrics(self) -> None:
        """Forget everything routed so far."""
        self._tally = _Tally(loads=torch.zeros(self.num_experts, dtype=torch.long),
                             demand=torch.zeros(self.num_experts, dtype=torch.long),
                             prob_sum=torch.zeros(self.num_experts, dtype=torch.float64))

    def _record(self, logits: torch.Tensor, out: ops.RouteOutput) -> None:
        T = logits.shape[0]
        E, k = self.num_experts, self.top_k
        tl = self._tally
        tl.calls += 1
        tl.tokens += T
        tl.assignments += T * k
        self.last_capacity = ops.route_capacity(self.capacity_factor, T, k, E)
        tl.capacities.append(self.last_capacity)
        kept = out.ids >= 0
        tl.dropped += int((~kept).sum())
        tl.loads += out.counts.long()
        # The choice before capacity: the same routing without drops.
        free = ops.route(logits, k, bias=self.bias, capacity_factor=0.0, **self.route_kwargs)
        tl.demand += free.counts.long()
        tl.rerouted += int((kept & (out.ids != free.ids)).sum())
        probs = route_scores(logits, self.route_kwargs["scoring"])
        tl.prob_sum += probs.double().sum(0)
        x = logits.float()
        x = torch.where(torch.isfinite(x), x, torch.full_like(x, -1e4))
        tl.z_sum += float((torch.logsumexp(x, dim=-1) ** 2).sum())
        if self.bias is not None and T > 0:
            load = out.counts.float()
            self.bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def get_load_balance_metrics(self) -> dict:
        """Measured load balance over everything routed since the last reset.

        Returns a dict with ``expert_loads`` (kept assignments per expert), ``expert_demand``
        (top-k choices before capacity), ``min_load``, ``max_load``, ``mean_load``,
        ``std_load``, ``imbalance`` (max / mean), ``dropped``, ``rerouted``, ``drop_rate``,
        ``capacity`` (of the last call), ``tokens``, ``assignments``, ``aux_loss``
        (Switch Transformer: ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of choices and
        ``P_e`` the mean router probability of expert ``e``) and ``z_loss`` (mean squared
        log-sum-exp of the logits).
        """
        tl = self._tally
        loads = tl.loads.double()
        mean = float(loads.mean()) if tl.tokens else 0.0
        f = tl.demand.double() / max(1, tl.assignments)
        P = tl.prob_sum / max(1, tl.tokens)
        return {
            "expert_loads": tl.loads.tolist(),
            "expert_demand": tl.demand.tolist(),
            "min_load": int(tl.loads.min()),
            "max_load": int(tl.loads.max()),
            "mean_load": mean,
            "std_load": float(loads.std(unbiased=False)),
            "imbalance": float(loads.max()) / mean if mean > 0 else 0.0,
            "dropped": tl.dropped,
            "rerouted": tl.rerouted,
            "drop_rate": tl.dropped / max(1, tl.assignments),
            "capacity": self.last_capacity,
            "tokens": tl.tokens,
            "assignments": tl.assignments,
            "aux_loss": float(self.num_experts * (f * P).sum()),
            "z_loss": tl.z_sum / max(1, tl.tokens),
        }
