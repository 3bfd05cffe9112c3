"""``sodkd calibrate --weights FILE --val ROOT [--output FILE]``: choose a student's output scale on validation pairs.

``ROOT`` is a paired folder (``ROOT/images``, ``ROOT/masks``, matched by stem; a local path or ``s3://`` with
credentials from the standard AWS chain). Every image runs through the weights the way ``sodkd predict`` runs them
(resized to the size the file records, or ``--size``; eager PyTorch; :mod:`cluster.calibrate`), and each candidate
scale ``k`` of ``--scales`` turns the finest map into ``sigmoid(k z)``, scored against the masks with
``kd.metrics`` (PySODMetrics conventions). The scale with the lowest MAE wins among those that cost at most
``--max-s-drop`` of S-measure (0.005 by default; :mod:`kd.calibration` says why a scale above 1 lowers MAE
without moving the 0.5 contour). The table of candidates is printed; with ``--output`` the weights are
written again with that scale folded into the finest head (:func:`models.fuse.scale_output`: no extra cost at
run time), their header keeping the input file's entries and adding ``output_scale`` (the product of every
calibration so far) and ``calibration`` (the set, the counts, MAE and S before and after). ``--json FILE`` writes
the same figures. Images or masks that cannot be decoded are listed and skipped.

Use validation pairs, never the test set: the scale is a setting chosen on data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _scales(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--scales: expected numbers > 0, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kd.calibration import MAX_S_DROP, SCALES
    parser.add_argument("--weights", required=True, type=Path, help="weights file written by save_weights")
    parser.add_argument("--val", required=True, help="paired validation folder ROOT (ROOT/images, ROOT/masks), "
                                                     "local or s3://")
    parser.add_argument("--output", type=Path, help="write the calibrated weights here (else only report)")
    parser.add_argument("--scales", type=_scales, default=SCALES,
                        help=f"candidate scales, comma-separated (default {','.join(f'{k:g}' for k in SCALES)})")
    parser.add_argument("--max-s-drop", type=float, default=MAX_S_DROP,
                        help=f"the most S-measure the scale may cost (default {MAX_S_DROP}; 1: pure MAE)")
    parser.add_argument("--size", type=int, help="working size (default: the one the weights record)")
    parser.add_argument("--limit", type=int, help="use the first N pairs only")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from cluster.calibrate import calibrate_model
    from cluster.catalog import paired_folder
    from models import extra_metadata, load_weights, read_metadata, save_weights

    if args.output is not None and args.output.resolve() == args.weights.resolve():
        raise ValueError(f"--output {args.output}: the same file as --weights; write the calibrated file elsewhere")
    if args.batch < 1 or (args.limit is not None and args.limit < 1) or (args.size is not None and args.size < 32):
        raise ValueError("--batch and --limit must be >= 1, --size >= 32")
    meta = read_metadata(args.weights)
    model = load_weights(args.weights)
    size = args.size or model.input_size
    cat = paired_folder(args.val, limit=args.limit)
    choice, record = calibrate_model(model, cat, args.val, size, args.scales, args.max_s_drop, args.batch)
    skipped = record["skipped"]
    print(f"{args.weights} at {size} px on {choice.images} pairs of {args.val}"
          + (f" ({len(skipped)} skipped: {', '.join(skipped[:5])})" if skipped else ""))
    print(choice.table())
    print(f"chosen scale {choice.scale:g}: MAE {choice.before['mae']:.4f} -> {choice.after['mae']:.4f}, "
          f"S {choice.before['sm']:.4f} -> {choice.after['sm']:.4f}")
    total = float(meta.get("output_scale", 1.0)) * choice.scale
    if args.output is not None:
        extra = {**extra_metadata(meta), "output_scale": total, "calibration": record}
        save_weights(model, args.output, extra_meta=extra, half=meta.get("dtype") == "float16")
        print(f"wrote {args.output} (output scale {total:g} in all)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"weights": str(args.weights), **record, "output_scale": total,
                                         "candidates": {f"{k:g}": m for k, m in choice.metrics.items()}},
                                        indent=1))
    return 0
