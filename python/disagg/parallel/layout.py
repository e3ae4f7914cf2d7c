"""How a job's ranks split a model: the (tp, pp, dp, cp) grid, the expert-parallel groups laid
over it, the torch.distributed process groups, and a report of who holds what."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelLayout:
    """A parallel layout. ``world = tp * pp * dp * cp``; ``ep`` does not add ranks.

    Rank order (tp fastest, pp slowest)::

        rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

    so the ranks of a TP group are neighbours (on one node when nodes hold consecutive ranks:
    TP all-reduces every layer and wants the fastest links), and a pipeline stage is a
    contiguous block of ranks.

    Expert parallelism lays ``ep`` groups over the TP x DP ranks of one (pp, cp) position:

    * ``ep_over_tp=True`` (the default): an EP group is ``ep / tp`` consecutive DP replicas x
      all their TP ranks; experts are whole on each rank, the TP ranks of a replica split that
      replica's tokens between them before the all-to-all and all-gather the results after.
      ``tp=2, ep=2`` is "EP across the TP ranks"; ``dp=2, ep=2`` is EP across replicas.
    * ``ep_over_tp=False``: an EP group is ``ep`` replicas at the same TP rank; every expert is
      split over TP (its intermediate dimension), results are all-reduced over TP.

    With ``ep == 1`` experts are TP-sharded like dense MLPs.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    cp: int = 1
    ep_over_tp: bool = True

    def __post_init__(self):
        for n in ("tp", "pp", "ep", "dp", "cp"):
            if getattr(self, n) < 1:
                raise ValueError(f"{n} must be >= 1, got {getattr(self, n)}")
        if self.ep > 1:
            if self.ep_over_tp:
                if self.ep % self.tp or self.dp % (self.ep // self.tp):
                    raise ValueError(f"ep={self.ep} must be tp ({self.tp}) times a divisor of "
                                     f"dp ({self.dp}) when EP spans the TP ranks")
            elif self.dp % self.ep:
                raise ValueError(f"ep={self.ep} must divide dp={self.dp} when experts are "
                                 f"split over TP (ep_over_tp=False)")
            if self.cp > 1:
                raise ValueError("ep > 1 together with cp > 1 is not supported")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def rank_of(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def coords(self, rank: int) -> dict:
        tp = rank % self.tp
        r = rank // self.tp
        cp = r % self.cp
        r //= self.cp
        dp = r % self.dp
        pp = r // self.dp
        return {"tp": tp, "pp": pp, "dp": dp, "cp": cp}

    # ---- group membership (pure functions of the layout: every rank computes the same) ----

    def _groups(self) -> dict:
        """Every group of every kind, as lists of global ranks, in a fixed order."""
        T, P, D, C = self.tp, self.pp, self.dp, self.cp
        g = {"tp": [], "pp": [], "cp": [], "dp": [], "ep": [], "replica": []}
        for p in range(P):
            for d in range(D):
                for c in range(C):
                    g["tp"].append([self.rank_of(t, p, d, c) for t in range(T)])
        for d in range(D):
            for c in range(C):
                for t in range(T):
                    g["pp"].append([self.rank_of(t, p, d, c) for p in range(P)])
        for p in range(P):
            for d in range(D):
                for t in range(T):
                    g["cp"].append([self.rank_of(t, p, d, c) for c in range(C)])
        for p in range(P):
            for c in range(C):
                for t in range(T):
                    g["dp"].append([self.rank_of(t, p, d, c) for d in range(D)])
        for d in range(D):
            g["replica"].append(sorted(self.rank_of(t, p, d, c) for t in range(T)
                                       for p in range(P) for c in range(C)))
        if self.ep > 1:
            for p in range(P):
                for c in range(C):
                    if self.ep_over_tp:
                        reps = self.ep // T
                        for b in range(D // reps):
                            g["ep"].append([self.rank_of(t, p, d, c)
                                            for d in range(b * reps, (b + 1) * reps)
                                            for t in range(T)])
                    else:
                        for t in range(T):
                            for b in range(D // self.ep):
                                g["ep"].append([self.rank_of(t, p, d, c) for d in
                                                range(b * self.ep, (b + 1) * self.ep)])
        return g

    def build(self, rank: Optional[int] = None) -> "RankGroups":
        """Create the process groups (collective: every rank calls ``new_group`` for every
        group, in the same order) and return this rank's."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"layout {self.describe()} needs tp*pp*dp*cp = {self.world_size} "
                             f"ranks, the job has {dist.get_world_size()}")
        rank = dist.get_rank() if rank is None else rank
        mine = {}
        for kind, groups in self._groups().items():
            for ranks in groups:
                # Groups of one rank need no communicator; skipping them saves start-up time.
                pg = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    mine[kind] = (pg, ranks)
        return RankGroups(self, rank, mine)

    def describe(self) -> str:
        s = f"tp={self.tp} pp={self.pp} dp={self.dp} cp={self.cp} ep={self.ep}"
        if self.ep > 1 and self.tp > 1:
            s += " (EP across TP ranks)" if self.ep_over_tp else " (TP inside experts)"
        return s

    # ---- what each rank holds ---------------------------------------------------------------

    def stage_layers(self, num_layers: int, stage: int) -> range:
        """Layers of pipeline stage ``stage``: contiguous and balanced (earlier stages get the
        remainder, as the first stage also embeds and the last also runs the LM head)."""
        return range(stage * num_layers // self.pp, (stage + 1) * num_layers // self.pp)

    def report(self, cfg) -> str:
        """Which rank holds which layers, heads, vocabulary rows and experts."""
        from ..moe.dispatcher import expert_range

        lines = [f"layout {self.describe()}  world={self.world_size}",
                 "rank  tp pp dp cp  layers    q-heads   kv-heads  vocab-rows     experts"]
        groups = self._groups()
        for r in range(self.world_size):
            c = self.coords(r)
            lay = self.stage_layers(cfg.num_hidden_layers, c["pp"])
            qh = head_range(cfg.num_attention_heads, self.tp, c["tp"])
            kh = kv_head_range(cfg.num_key_value_heads, self.tp, c["tp"])
            vr = vocab_range(cfg.vocab_size, self.tp, c["tp"])
            if not cfg.is_moe:
                ex = "-"
            elif self.ep == 1:
                ex = f"all {cfg.num_experts} (1/{self.tp} of each)" if self.tp > 1 else "all"
            else:
                grp = next(g for g in groups["ep"] if r in g)
                er = expert_range(grp.index(r), self.ep, cfg.num_experts)
                ex = f"{er.start}-{er.stop - 1}"
                if not self.ep_over_tp and self.tp > 1:
                    ex += f" (1/{self.tp} of each)"
            lines.append(f"{r:>4}  {c['tp']:>2} {c['pp']:>2} {c['dp']:>2} {c['cp']:>2}  "
                         f"{lay.start:>2}-{lay.stop - 1:<5}  {qh.start:>2}-{qh.stop - 1:<5}  "
                         f"{kh.start:>2}-{kh.stop - 1:<5}  {vr.start:>5}-{vr.stop - 1:<6}  {ex}")
        return "\n".join(lines)


def head_range(n: int, tp: int, r: int) -> range:
    if n % tp:
        raise ValueError(f"{n} attention heads do not split over tp={tp}")
    return range(r * n // tp, (r + 1) * n // tp)


def kv_head_range(n: int, tp: int, r: int) -> range:
    """KV heads of TP rank ``r``: split when there are at least ``tp`` of them, otherwise each
    is replicated on the ``tp / n`` ranks whose query heads use it (GQA)."""
    if n >= tp:
        return head_range(n, tp, r)
    if tp % n:
        raise ValueError(f"{n} KV heads cannot be shared evenly by tp={tp} ranks")
    h = r * n // tp
    return range(h, h + 1)


def vocab_range(v: int, tp: int, r: int) -> range:
    """Vocabulary rows of TP rank ``r``: equal shares of the vocabulary padded to ``tp``."""
    per = -(-v // tp)
    return range(min(v, r * per), min(v, (r + 1) * per))


@dataclass
class RankGroups:
    """One rank's groups: ``(ProcessGroup or None, global ranks)`` per kind."""

    layout: ParallelLayout
    rank: int
    groups: dict

    def __post_init__(self):
        self.coords = self.layout.coords(self.rank)

    def group(self, kind: str):
        return self.groups.get(kind, (None, [self.rank]))[0]

    def ranks(self, kind: str) -> list:
        return self.groups.get(kind, (None, [self.rank]))[1]
