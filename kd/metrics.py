"""Salient-object-detection metrics: a thin layer over PySODMetrics (package ``pysodmetrics``).

:class:`SODEvaluator` feeds each (prediction, mask) pair to the library's own evaluators and names the
results with the keys in :data:`kd.schema.METRIC_KEYS`:

=========  ==============================================================================================
``mae``    mean absolute error between the normalised prediction and the binary mask
``sm``     S-measure, alpha 0.5
``wfm``    weighted F-measure (beta 1)
``em_*``   E-measure: ``adp`` at the adaptive threshold ``min(2 * mean(pred), 1)``, ``mean`` / ``max`` of the
           per-threshold curve (256 thresholds)
``fm_*``   F-measure with beta^2 = 0.3: ``adp`` at the adaptive threshold, ``mean`` / ``max`` of the curve
=========  ==============================================================================================

Conventions, all the library's defaults (they reproduce its published reference values and the SOCToolbox
figures for ICON on SOC-AC, see ``tests/unit/test_metrics.py``):

- inputs are uint8 grayscale; the prediction is resized to the mask's size (PIL bilinear) when they differ;
- the mask is binarised as ``gt > 128``;
- every prediction is min-max rescaled on its own (``normalize=True``; older toolboxes divide by the max);
- curves are per image and averaged over images, and mean/max are taken on the averaged curve. For F this
  is *not* the F of the averaged precision/recall curve (which the PR plot shows): on SOC-ICON the per-image
  F curve gives mean/max .793/.814, the F of the mean PR curve .810/.836.
"""

from __future__ import annotations

import warnings

import numpy as np
import py_sod_metrics as psm
from PIL import Image

from kd.schema import METRIC_KEYS

MAE, SM, WFM = "mae", "sm", "wfm"
EM_ADP, EM_MEAN, EM_MAX = "em_adp", "em_mean", "em_max"
FM_ADP, FM_MEAN, FM_MAX = "fm_adp", "fm_mean", "fm_max"
if {MAE, SM, WFM, EM_ADP, EM_MEAN, EM_MAX, FM_ADP, FM_MEAN, FM_MAX} != set(METRIC_KEYS):
    raise ImportError(f"kd.metrics computes keys that differ from kd.schema.METRIC_KEYS {METRIC_KEYS}")
FM_BETA2 = 0.3


def _as_gray_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D grayscale map, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def resize_to(pred: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 map to ``(height, width)`` with PIL bilinear (no-op if it already has that size)."""
    if pred.shape == tuple(shape_hw):
        return pred
    h, w = shape_hw
    return np.asarray(Image.fromarray(pred).resize((w, h), Image.BILINEAR))


class SODEvaluator:
    """Accumulates SOD metrics over images: ``step(pred, gt)`` per image, then ``results()``/``curves()``."""

    def __init__(self):
        self._mae = psm.MAE()
        self._sm = psm.Smeasure()
        self._wfm = psm.WeightedFmeasure()
        self._em = psm.Emeasure()
        self._fm = psm.FmeasureV2({
            "fm": psm.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=FM_BETA2),
            "pre": psm.PrecisionHandler(with_dynamic=True, with_adaptive=False),
            "rec": psm.RecallHandler(with_dynamic=True, with_adaptive=False),
        })
        self.count = 0

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: HxW uint8 saliency map (0..255), any size: resized bilinearly to the mask's size.
            gt: HxW uint8 mask; pixels > 128 are foreground.
        """
        gt = _as_gray_uint8(gt, "gt")
        pred = resize_to(_as_gray_uint8(pred, "pred"), gt.shape)
        with warnings.catch_warnings():
            # the library warns on some degenerate (e.g. empty) masks; the values it returns are defined
            warnings.simplefilter("ignore", RuntimeWarning)
            for metric in (self._mae, self._sm, self._wfm, self._em, self._fm):
                metric.step(pred=pred, gt=gt)
        self.count += 1

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise ValueError("no images evaluated: call step() at least once")

    def results(self) -> dict[str, float]:
        """The nine metrics, keyed by :data:`kd.schema.METRIC_KEYS`, as plain floats."""
        self._check_nonempty()
        em = self._em.get_results()["em"]
        fm = self._fm.get_results()["fm"]
        values = {
            MAE: self._mae.get_results()["mae"],
            SM: self._sm.get_results()["sm"],
            WFM: self._wfm.get_results()["wfm"],
            EM_ADP: em["adp"],
            EM_MEAN: em["curve"].mean(),
            EM_MAX: em["curve"].max(),
            FM_ADP: fm["adaptive"],
            FM_MEAN: fm["dynamic"].mean(),
            FM_MAX: fm["dynamic"].max(),
        }
        return {k: float(values[k]) for k in METRIC_KEYS}

    def curves(self) -> dict[str, np.ndarray]:
        """Per-threshold curves averaged over images, ordered by ascending threshold 0..255.

        Returns ``thresholds`` (0..255: a pixel is foreground when ``255 * pred >= threshold`` after min-max
        normalisation), ``precision`` and ``recall`` (for a PR curve), ``fmeasure`` and ``emeasure``.
        """
        self._check_nonempty()
        fm = self._fm.get_results()
        # the library orders its 256 per-threshold values from threshold 255 down to 0
        out = {
            "thresholds": np.arange(256),
            "precision": fm["pre"]["dynamic"][::-1],
            "recall": fm["rec"]["dynamic"][::-1],
            "fmeasure": fm["fm"]["dynamic"][::-1],
            "emeasure": np.asarray(self._em.get_results()["em"]["curve"])[::-1],
        }
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}
