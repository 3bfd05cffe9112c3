"""``sodkd models``: the registered models with their size and cost.

Prints one row per model: parameters (millions) and GMACs for one ``--size`` x ``--size`` image, plus the
factory's one-line description. Building the teachers and running one forward pass each takes a few
seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=352, help="square input size for the MAC count (default 352)")
    parser.add_argument("--filter", default="*", metavar="PATTERN",
                        help="shell-style pattern on model names, e.g. 'scfnet_r*'")


def model_table(size: int = 352, pattern: str = "*") -> list[dict]:
    """One dict per registered model: name, params, macs, description."""
    from models import count_macs, count_params, create_model, describe_model, list_models

    rows = []
    with torch.inference_mode():
        for name in list_models(pattern):
            model = create_model(name)
            rows.append({"name": name, "params": count_params(model), "macs": count_macs(model, size),
                         "description": describe_model(name)})
    return rows


def format_table(rows: list[dict], size: int) -> str:
    w = max([len("model"), *(len(r["name"]) for r in rows)])
    header = f"{'model':<{w}} {'params (M)':>10} {f'GMACs@{size}':>11}  description"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<{w}} {r['params'] / 1e6:>10.3f} {r['macs'] / 1e9:>11.3f}  {r['description']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.size < 32:
        raise ValueError(f"--size must be at least 32 (the encoders downsample by 32), got {args.size}")
    rows = model_table(args.size, args.filter)
    if not rows:
        raise ValueError(f"--filter {args.filter!r} matches no registered model")
    print(format_table(rows, args.size))
    return 0
