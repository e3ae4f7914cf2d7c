"""Speculative decoding in the server: command-line options, the worker engines' setting, the
per-request ``speculative`` JSON field, and the figures on ``/metrics``.

A request may carry ``"speculative": "off" | "ngram" | "draft"`` or an object
``{"method": ..., "tree": "chain:4" | "static:2,2" | "dynamic:12,5,3", "min_prob": 0.2,
"backoff": 8}``;
anything else is a 400 naming the field. Prefill ranks never speculate (they compute prompts
only); decode and colocated ranks run the server's ``--speculative`` setting, overridable per
request. In the disaggregated decode pool only the target's KV arrives from the prefill rank:
the draft model computes its own prompt KV on the decode rank, at the request's first
speculative step.
"""
from __future__ import annotations

from typing import Optional

from ..spec.config import METHODS, SpecConfig, TreeShape, add_spec_args, spec_config_from_args

FIELD = "speculative"
MAX_TREE_NODES = 64  # per request: bounds the KV slots and the verify work one request adds
_KEYS = ("method", "tree", "min_prob", "backoff", "stochastic")
MAX_BACKOFF = 1024


def add_args(parser) -> None:
    """``--speculative draft|ngram|off``, ``--spec-tree``, ``--draft-model``,
    ``--spec-min-prob``, ``--spec-backoff``, ``--spec-stochastic``."""
    add_spec_args(parser)


def engine_speculative(args, role: str) -> Optional[SpecConfig]:
    """The engine setting of a worker rank: none on prefill ranks, the server's otherwise."""
    if role == "prefill" or not hasattr(args, "speculative"):
        return None
    return spec_config_from_args(args)


def check_args(args) -> None:
    """Fail at start-up (not in a worker) on a bad speculative setting."""
    if getattr(args, "speculative", "off") == "off":
        return
    try:
        cfg = spec_config_from_args(args)
        if cfg.method == "draft":
            from ..model import ModelConfig, resolve_model_path

            dv = ModelConfig.from_file(resolve_model_path(cfg.draft_model)).vocab_size
            tv = ModelConfig.from_file(resolve_model_path(args.model)).vocab_size
            if dv > tv:
                raise ValueError(f"--draft-model {cfg.draft_model!r} has a larger vocabulary "
                                 f"({dv}) than --model ({tv}): they must share the tokenizer")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"disagg.serve: {e}")


def parse_request(data: dict, args) -> Optional[object]:
    """The request's ``speculative`` field, checked and normalised to JSON (a method name or
    an object), or None when absent. Raises ``ValueError`` with a message naming the field."""
    if FIELD not in data or data[FIELD] is None:
        return None
    v = data[FIELD]
    if isinstance(v, str):
        v = {"method": v}
    if not isinstance(v, dict):
        raise ValueError(f"'{FIELD}' must be one of {list(METHODS)} or an object with "
                         f"'method' and optional 'tree', 'min_prob', got {type(v).__name__}")
    extra = sorted(set(v) - set(_KEYS))
    if extra:
        raise ValueError(f"'{FIELD}' has unknown key(s) {extra}; allowed: {list(_KEYS)}")
    method = v.get("method")
    if method not in METHODS:
        raise ValueError(f"'{FIELD}.method' must be one of {list(METHODS)}, got {method!r}")
    if method == "draft" and getattr(args, "speculative", "off") != "draft":
        raise ValueError(f"'{FIELD}.method' 'draft' needs a server started with "
                         "--speculative draft (no draft model is loaded)")
    out = {"method": method}
    if "tree" in v:
        if not isinstance(v["tree"], str):
            raise ValueError(f"'{FIELD}.tree' must be a string such as 'chain:4'")
        try:
            shape = TreeShape.parse(v["tree"])
        except ValueError as e:
            raise ValueError(f"'{FIELD}.tree': {e}") from None
        if shape.max_nodes - 1 > MAX_TREE_NODES:
            raise ValueError(f"'{FIELD}.tree' {v['tree']!r} has {shape.max_nodes - 1} draft "
                             f"nodes; at most {MAX_TREE_NODES} per request")
        out["tree"] = v["tree"]
    if "min_prob" in v:
        mp = v["min_prob"]
        if isinstance(mp, bool) or not isinstance(mp, (int, float)) or not 0 <= mp < 1:
            raise ValueError(f"'{FIELD}.min_prob' must be a number in [0, 1), got {mp!r}")
        out["min_prob"] = float(mp)
    if "backoff" in v:
        bo = v["backoff"]
        if isinstance(bo, bool) or not isinstance(bo, int) or not 0 <= bo <= MAX_BACKOFF:
            raise ValueError(f"'{FIELD}.backoff' must be an integer in [0, {MAX_BACKOFF}], "
                             f"got {bo!r}")
        out["backoff"] = bo
    if "stochastic" in v:
        if not isinstance(v["stochastic"], bool):
            raise ValueError(f"'{FIELD}.stochastic' must be true or false")
        out["stochastic"] = v["stochastic"]
    return out


def to_param(v, default: Optional[SpecConfig] = None):
    """A normalised JSON value (from :func:`parse_request`) as ``SamplingParams.speculative``;
    unset fields take the server's setting where the method is the same."""
    if v is None:
        return None
    if isinstance(v, str):
        v = {"method": v}
    if v["method"] == "off":
        return "off"
    base = default if default is not None and default.method == v["method"] else None
    kw = {"method": v["method"]}
    kw["tree"] = v.get("tree", base.tree if base is not None else TreeShape.chain(4))
    kw["min_prob"] = v.get("min_prob", base.min_prob if base is not None else 0.0)
    kw["stochastic"] = v.get("stochastic", base.stochastic if base is not None else False)
    kw["backoff"] = v.get("backoff", base.backoff if base is not None else 0)
    return SpecConfig(**kw)


def params_kwargs(d: dict, engine=None) -> dict:
    """``SamplingParams`` keyword for the ``speculative`` entry of a worker's params JSON."""
    if d.get(FIELD) is None:
        return {}
    default = engine.spec.default if engine is not None else None
    return {"speculative": to_param(d[FIELD], default)}


def worker_stats(engine, role: str) -> dict:
    """Raw counters of a worker's speculation, for its periodic stats message (none from
    prefill ranks, which never speculate)."""
    spec = getattr(engine, "spec", None)
    if spec is None or role == "prefill":
        return {}
    m = spec.metrics
    out = {"spec_verify_steps": m.verify_steps, "spec_emitted_tokens": m.emitted_tokens,
           "spec_draft_nodes": m.draft_nodes, "spec_draft_s": m.draft_s,
           "spec_verify_s": m.verify_s, "spec_depth_tried": list(m.depth_tried),
           "spec_depth_accepted": list(m.depth_accepted)}
    d = spec.drafter
    if d is not None:
        out["spec_draft_blocks_total"] = d.kv.num_blocks
        out["spec_draft_blocks_used"] = d.kv.num_blocks - d.kv.num_free_blocks
    return out


def gauges(roles: dict, stats: dict) -> list:
    """``(name, labels, value)`` per pool that speculates: acceptance length (mean tokens per
    verified tree, bonus included), acceptance rate by depth, draft and verify seconds, the
    raw counts, and the draft model's KV blocks in use."""
    pools: dict = {}
    for rank, role in roles.items():
        s = stats.get(rank)
        if s is None or "spec_verify_steps" not in s:
            continue
        p = pools.setdefault(role, {"steps": 0, "emitted": 0, "nodes": 0, "draft_s": 0.0,
                                    "verify_s": 0.0, "tried": [], "acc": [], "used": 0,
                                    "total": 0})
        p["steps"] += s["spec_verify_steps"]
        p["emitted"] += s["spec_emitted_tokens"]
        p["nodes"] += s["spec_draft_nodes"]
        p["draft_s"] += s["spec_draft_s"]
        p["verify_s"] += s["spec_verify_s"]
        for key, src in (("tried", "spec_depth_tried"), ("acc", "spec_depth_accepted")):
            for d, n in enumerate(s[src]):
                if d >= len(p[key]):
                    p[key].append(0)
                p[key][d] += n
        p["used"] += s.get("spec_draft_blocks_used", 0)
        p["total"] += s.get("spec_draft_blocks_total", 0)
    out = []
    for role, p in pools.items():
        lab = {"pool": role}
        out += [("disagg_spec_acceptance_length", lab,
                 p["emitted"] / p["steps"] if p["steps"] else 0.0),
                ("disagg_spec_verify_steps", lab, p["steps"]),
                ("disagg_spec_emitted_tokens", lab, p["emitted"]),
                ("disagg_spec_draft_nodes", lab, p["nodes"]),
                ("disagg_spec_draft_seconds", lab, p["draft_s"]),
                ("disagg_spec_verify_seconds", lab, p["verify_s"]),
                ("disagg_spec_draft_kv_blocks_used", lab, p["used"]),
                ("disagg_spec_draft_kv_blocks_total", lab, p["total"])]
        for d, (t, a) in enumerate(zip(p["tried"], p["acc"])):
            out.append(("disagg_spec_acceptance_rate", dict(lab, depth=str(d + 1)),
                        a / t if t else 0.0))
    out.sort(key=lambda g: g[0])  # one block per metric (stable: pools keep their order)
    return out
