"""``disagg-bench``: one subcommand per op family (and ``serve`` for the serving benchmark).

Each family module defines ``add_arguments(parser)`` and ``run(args) -> list[dict]``; ``--check``
compares the op with its reference before timing, ``--json`` prints one JSON object per case.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

FAMILIES = {
    "routing": "disagg.bench.routing",
    "kv": "disagg.bench.kv",
    "tree": "disagg.bench.tree",
    "attention": "disagg.bench.attention",
    "experts": "disagg.bench.experts",
}
# ``serve`` drives a running server over HTTP: it takes none of the op flags (--device,
# --check, --min-run-time) and prints its own report.
SERVE = "disagg.bench.serve"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="disagg-bench", description=__doc__)
    sub = parser.add_subparsers(dest="family", required=True)
    modules = {}
    for name, modname in FAMILIES.items():
        mod = importlib.import_module(modname)
        modules[name] = mod
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--check", action="store_true", help="compare with the reference first")
        p.add_argument("--json", action="store_true", help="one JSON object per case")
        p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
        mod.add_arguments(p)
    p = sub.add_parser("serve", help="serving benchmark against an OpenAI-compatible server")
    importlib.import_module(SERVE).add_arguments(p)
    args = parser.parse_args(argv)
    if args.family == "serve":
        serve = importlib.import_module(SERVE)
        out = serve.run_bench(args)
        print(json.dumps(out))
        return 0
    import torch

    import disagg  # noqa: F401

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    rows = modules[args.family].run(args)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        from .common import device_name, format_table

        print(f"device: {device_name(args.device)}")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
