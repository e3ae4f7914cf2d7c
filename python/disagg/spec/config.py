"""Speculative decoding settings: the drafter, the tree shape, and their parsing from text."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

METHODS = ("off", "ngram", "draft")


@dataclass(frozen=True)
class TreeShape:
    """The shape of the draft tree proposed at every step.

    Static trees give every node at depth ``d`` the ``branching[d]`` best candidates as
    children (a chain is ``branching = (1,) * k``). Dynamic trees (EAGLE-2) grow from the draft
    probabilities: at each depth the ``topk`` most probable leaves (by path probability) are
    expanded into their ``topk`` best children, and finally the ``num_nodes`` most probable
    nodes are kept.

    Parameters
    ----------
    branching : tuple of int
        Static trees: children per node at each depth (depth 1 first).
    dynamic : bool
        Grow the tree from draft probabilities (needs a draft model; n-gram falls back to the
        static shape ``(topk,) + (1,) * (depth - 1)``).
    num_nodes, depth, topk : int
        Dynamic trees: draft nodes kept (root excluded), maximum depth, leaves expanded per
        depth and children per expanded leaf.
    """

    branching: tuple = (1, 1, 1, 1)
    dynamic: bool = False
    num_nodes: int = 16
    depth: int = 5
    topk: int = 4

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        if self.dynamic:
            for name in ("num_nodes", "depth", "topk"):
                v = getattr(self, name)
                if not isinstance(v, int) or v < 1:
                    raise ValueError(f"TreeShape.{name} must be an int >= 1, got {v!r}")
        elif not self.branching or any(b < 1 for b in self.branching):
            raise ValueError(f"TreeShape.branching must be ints >= 1, got {self.branching!r}")

    @classmethod
    def chain(cls, k: int) -> "TreeShape":
        """``k`` draft tokens in a line."""
        return cls(branching=(1,) * k)

    @classmethod
    def parse(cls, text: Union[str, "TreeShape"]) -> "TreeShape":
        """From ``"chain:K"``, ``"static:B1,B2,..."`` or ``"dynamic:NODES,DEPTH,TOPK"``."""
        if isinstance(text, TreeShape):
            return text
        kind, _, arg = str(text).partition(":")
        try:
            nums = [int(x) for x in arg.split(",") if x.strip()]
            if kind == "chain" and len(nums) == 1:
                return cls.chain(nums[0])
            if kind == "static" and nums:
                return cls(branching=tuple(nums))
            if kind == "dynamic" and len(nums) == 3:
                return cls(dynamic=True, num_nodes=nums[0], depth=nums[1], topk=nums[2])
        except ValueError:
            pass
        raise ValueError(f"bad tree shape {text!r}: use chain:K, static:B1,B2,... or "
                         "dynamic:NODES,DEPTH,TOPK")

    @property
    def max_depth(self) -> int:
        return self.depth if self.dynamic else len(self.branching)

    @property
    def max_nodes(self) -> int:
        """Upper bound on the nodes of a tree, root included."""
        if self.dynamic:
            return 1 + self.num_nodes
        n, width = 1, 1
        for b in self.branching:
            width *= b
            n += width
        return n

    def static_branching(self) -> tuple:
        """The static shape used where probabilities are not available (n-gram)."""
        if self.dynamic:
            return (self.topk,) + (1,) * (self.depth - 1)
        return self.branching


@dataclass
class SpecConfig:
    """Speculative decoding for an engine, or for one request (``SamplingParams.speculative``).

    Parameters
    ----------
    method : {"off", "ngram", "draft"}
        ``ngram``: prompt lookup, no model. ``draft``: a small draft model sharing the target's
        tokenizer (the engine's ``draft_model``).
    tree : TreeShape or str
        See :class:`TreeShape`; strings as in :meth:`TreeShape.parse`.
    draft_model : str or CausalLM, optional
        Engine level only: the draft checkpoint (a folder, ``"default-draft"`` or a loaded
        model). Required for ``method="draft"``.
    stochastic : bool
        For sampled requests with a draft model and a static tree: draw the children from the
        draft distribution and verify with it (SpecInfer); otherwise the drafts are the top
        candidates (deterministic proposals). Both are lossless.
    ngram_max, ngram_min : int
        Longest and shortest suffix matched by prompt lookup.
    min_prob : float
        Draft model, deterministic drafts: a child whose draft probability (given its parent)
        is below this is not proposed, nor expanded, so the tree shrinks, down to plain
        decoding, where the draft is unsure. 0 keeps the full shape. Tokens never change
        (verification decides); only the work per step does.
    backoff : int
        After ``k`` steps in a row that accept no draft (or draft nothing), the request
        decodes plainly, without drafting, for ``min(backoff, 2**(k-1))`` steps; an accepted
        draft resets it. 0 (default) always speculates. Where the drafter rarely agrees with
        the target this bounds the loss to a probing step now and then. Lossless: whether a
        step speculates depends only on earlier steps.
    """

    method: str = "off"
    tree: Union[TreeShape, str] = field(default_factory=lambda: TreeShape.chain(4))
    draft_model: object = None
    stochastic: bool = False
    ngram_max: int = 4
    ngram_min: int = 1
    min_prob: float = 0.0
    backoff: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SpecConfig.method must be one of {METHODS}, got {self.method!r}")
        self.tree = TreeShape.parse(self.tree)
        if not (isinstance(self.min_prob, (int, float)) and 0 <= self.min_prob < 1):
            raise ValueError(f"SpecConfig.min_prob must be in [0, 1), got {self.min_prob!r}")
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, int) or \
                self.backoff < 0:
            raise ValueError(f"SpecConfig.backoff must be an int >= 0, got {self.backoff!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("SpecConfig: need 1 <= ngram_min <= ngram_max, got "
                             f"{self.ngram_min}, {self.ngram_max}")

    @classmethod
    def coerce(cls, x: Optional[Union["SpecConfig", str]]) -> Optional["SpecConfig"]:
        """``None`` stays None; a method name becomes a config with the default tree."""
        if x is None or isinstance(x, SpecConfig):
            return x
        if isinstance(x, str):
            return cls(method=x)
        raise ValueError(f"speculative must be a SpecConfig or one of {METHODS}, got {x!r}")


def add_spec_args(parser) -> None:
    """Add ``--speculative``, ``--spec-tree``, ``--draft-model`` and ``--spec-stochastic`` to
    an ``argparse`` parser (servers and CLIs share one spelling)."""
    parser.add_argument("--speculative", choices=METHODS, default="off",
                        help="speculative decoding: draft model, n-gram lookup, or off")
    parser.add_argument("--spec-tree", default="chain:4",
                        help="draft tree: chain:K, static:B1,B2,... or dynamic:NODES,DEPTH,TOPK")
    parser.add_argument("--draft-model", default="default-draft",
                        help="draft model folder for --speculative draft")
    parser.add_argument("--spec-stochastic", action="store_true",
                        help="sampled requests draw draft children from the draft distribution")
    parser.add_argument("--spec-min-prob", type=float, default=0.0,
                        help="draft model: do not propose children below this draft probability")
    parser.add_argument("--spec-backoff", type=int, default=0,
                        help="after steps without an accepted draft, decode plainly for up to "
                             "this many steps (doubling); 0 always speculates")


def spec_config_from_args(args) -> Optional[SpecConfig]:
    """The :class:`SpecConfig` for parsed :func:`add_spec_args` options (None when off)."""
    if args.speculative == "off":
        return None
    return SpecConfig(args.speculative, tree=args.spec_tree, stochastic=args.spec_stochastic,
                      draft_model=args.draft_model if args.speculative == "draft" else None,
                      min_prob=getattr(args, "spec_min_prob", 0.0),
                      backoff=getattr(args, "spec_backoff", 0))
