"""``sodkd eval --pred DIR --gt DIR [--json FILE]``: score a folder of saliency maps against masks.

Files are paired by stem (``preds/X.png`` with ``masks/X.png``, any image extension); both are read as
8-bit grayscale (``convert("L")``, so masks stored as RGB with equal channels read correctly); each
prediction is resized to its mask (PIL bilinear) and scored by :class:`kd.metrics.SODEvaluator` (PySODMetrics
defaults: ``mask > 128``, per-image min-max normalisation). Files without a partner are counted and
reported, not scored. Other jobs call :func:`evaluate_dirs`.

The JSON file holds ``{"metrics": {<the 9 keys of kd.schema.METRIC_KEYS>}, "num_images", "unmatched_pred",
"unmatched_gt", "pred_dir", "gt_dir"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kd.metrics import SODEvaluator
from kd.schema import IMAGE_EXTENSIONS, METRIC_KEYS

log = logging.getLogger(__name__)

_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass
class Pairing:
    """Prediction/mask files matched by stem, and the files left without a partner."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched_pred: list[Path] = field(default_factory=list)
    unmatched_gt: list[Path] = field(default_factory=list)


def _images_by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} directory {folder} does not exist or is not a directory")
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in by_stem:
            raise ValueError(f"{role} directory {folder}: two files share the stem {p.stem!r}: "
                             f"{by_stem[p.stem].name} and {p.name}")
        by_stem[p.stem] = p
    if not by_stem:
        raise ValueError(f"{role} directory {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return by_stem


def pair_files(pred_dir: str | Path, gt_dir: str | Path) -> Pairing:
    """Match predictions to masks by file stem; error naming the directories when nothing matches."""
    preds = _images_by_stem(Path(pred_dir), "prediction")
    gts = _images_by_stem(Path(gt_dir), "mask")
    common = sorted(preds.keys() & gts.keys())
    if not common:
        raise ValueError(f"no prediction in {pred_dir} has a mask with the same file stem in {gt_dir} "
                         f"({len(preds)} predictions, {len(gts)} masks; e.g. {next(iter(preds))!r} vs "
                         f"{next(iter(gts))!r})")
    return Pairing(pairs=[(preds[s], gts[s]) for s in common],
                   unmatched_pred=[preds[s] for s in sorted(preds.keys() - gts.keys())],
                   unmatched_gt=[gts[s] for s in sorted(gts.keys() - preds.keys())])


def read_gray(path: Path) -> np.ndarray:
    """An 8-bit image file as HxW uint8 grayscale (RGB masks with equal channels come back unchanged)."""
    with Image.open(path) as img:
        if img.mode not in _EIGHT_BIT_MODES:
            raise ValueError(f"{path}: expected an 8-bit image, got mode {img.mode}")
        return np.asarray(img.convert("L"), dtype=np.uint8)


def evaluate_pairs(pairs: list[tuple[Path, Path]]) -> dict[str, float]:
    """Score (prediction, mask) file pairs; returns the nine metrics keyed by ``kd.schema.METRIC_KEYS``."""
    evaluator = SODEvaluator()
    for pred_path, gt_path in pairs:
        evaluator.step(read_gray(pred_path), read_gray(gt_path))
    return evaluator.results()


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
    """Score every prediction in ``pred_dir`` that has a mask of the same stem in ``gt_dir``.

    Returns ``{mae, sm, wfm, em_adp, em_mean, em_max, fm_adp, fm_mean, fm_max}`` as floats; unmatched files
    are logged as warnings.
    """
    pairing = pair_files(pred_dir, gt_dir)
    _warn_unmatched(pairing, pred_dir, gt_dir)
    return evaluate_pairs(pairing.pairs)


def _warn_unmatched(pairing: Pairing, pred_dir, gt_dir) -> None:
    if pairing.unmatched_pred:
        log.warning("%d predictions in %s have no mask in %s (e.g. %s)", len(pairing.unmatched_pred), pred_dir,
                    gt_dir, pairing.unmatched_pred[0].name)
    if pairing.unmatched_gt:
        log.warning("%d masks in %s have no prediction in %s (e.g. %s)", len(pairing.unmatched_gt), gt_dir,
                    pred_dir, pairing.unmatched_gt[0].name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted maps (8-bit grayscale)")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth masks, same file stems")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    pairing = pair_files(args.pred, args.gt)
    _warn_unmatched(pairing, args.pred, args.gt)
    metrics = evaluate_pairs(pairing.pairs)
    print(f"evaluated {len(pairing.pairs)} pairs ({len(pairing.unmatched_pred)} predictions without mask, "
          f"{len(pairing.unmatched_gt)} masks without prediction)")
    for key in METRIC_KEYS:
        print(f"{key:>8s}  {metrics[key]:.4f}")
    if args.json is not None:
        report = {"metrics": metrics, "num_images": len(pairing.pairs),
                  "unmatched_pred": len(pairing.unmatched_pred), "unmatched_gt": len(pairing.unmatched_gt),
                  "pred_dir": str(args.pred), "gt_dir": str(args.gt)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
