"""The foundation-model teacher: captioner -> grounding detector -> SAM, one Ray Data actor pool per stage. This
module holds its config, the pure maths of its labels and the label-shard columns it adds; the stages that run the
models are :mod:`cluster.label.foundation`.

For domains without a SOD teacher (He et al., arXiv 2501.04582), pseudo masks come from three foundation
models run in sequence over the decoded images of the labelling job:

1. :class:`Captioner` -- BLIP (``BlipForConditionalGeneration``) names what the image shows; a fixed prompt
   (``captioner.fixed_prompt``) may replace it, and then no captioner pool runs at all;
2. :class:`Grounder` -- GroundingDINO (``GroundingDinoForObjectDetection``) turns the caption into boxes with
   scores; up to ``max_boxes`` boxes above ``box_threshold`` survive a class-agnostic NMS. An image with no box
   becomes a reject (``reason = "no_detection"``), not an empty label;
3. :class:`Segmenter` -- SAM (``SamModel``) cuts every box out; its mask logits become the soft pseudo mask
   and, with the box scores, a per-pixel **confidence map**.

Each stage is a plain callable class (``Stage(...)(batch) -> batch``, :mod:`cluster.label.foundation`) that a
unit test can call directly; the labelling job hands the same classes to ``map_batches`` each with its own ``ActorPoolStrategy``, ``num_cpus``,
``num_gpus`` and ``batch_size`` from :class:`StageResources`, so a GPU-heavy SAM pool and a light captioner
pool scale separately. Models are Hugging Face ids (``Salesforce/blip-image-captioning-large``,
``IDEA-Research/grounding-dino-tiny``, ``facebook/sam-vit-base``) or local directories written by
``save_pretrained``; ``local_files_only`` keeps a worker off the network.

Confidence map (per pixel ``x``; ``k`` runs over the kept boxes of one image)::

    p_k(x) = sigmoid(L_k(x))                 # SAM's mask logits L_k, resized to the image
    stab_k = |{L_k > +d}| / |{L_k > -d}|     # SAM's stability score, d = segmenter.stability_offset
    q_k    = s_k * clip(iou_k, 0, 1) * stab_k    # box score * SAM's predicted IoU * stability
    p(x)   = max_k p_k(x)                    # the pseudo mask: union of the object masks
    c(x)   = q_{k*(x)} * |2 p(x) - 1|,  k*(x) = argmax_k p_k(x)

so a pixel is trusted when the object that claims it is well detected, well segmented and stable, *and* SAM
is decided about that pixel (``|2p - 1|`` is 0 on the mask's soft boundary and 1 far from it). ``c`` lies in
[0, 1]; the trainer trusts pixels with ``c >= tau`` (``kd.pseudo_labels.trust_mask``).

Columns: in ``ID, KEY, IMAGE`` (uint8 HxWx3), ``ORIG_H, ORIG_W``, ``REASON`` (optional; rows already
rejected pass through untouched); out, added: ``CAPTION``, ``BOXES`` (flat x0,y0,x1,y1 in original-image
pixels), ``BOX_SCORES``, ``MASK_SCORES`` (``q_k``), ``LABEL`` and ``CONF`` (uint8, square
``label_size``), ``CONF_MEAN``/``CONF_FRAC``/``FG_FRAC``, ``TEACHER``, ``WEIGHTS_HASH``, ``TTA``,
``REASON``/``DETAIL``; ``IMAGE`` is dropped. The labelling job encodes ``LABEL`` and ``CONF`` to PNG and writes
them, with the columns of :func:`foundation_fields`, to the same label shards as a SOD teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.raypool import torch_threads
from kd import schema

__all__ = ["StageResources", "CaptionerConfig", "DetectorConfig", "SegmenterConfig", "FoundationConfig", "teacher_id",
           "confidence_map", "stability_score", "caption_to_query", "nms", "foundation_fields",
           "foundation_columns"]


# --- configuration ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageResources:
    """Ray resources of one stage's actor pool.

    Attributes:
        pool_size: actors in the pool (the minimum when ``max_pool_size`` is set).
        max_pool_size: let Ray Data autoscale the pool up to this many actors (None = fixed size).
        num_cpus: CPUs per actor; fractional values let several light actors share a core.
        num_gpus: GPUs per actor (fractions share one GPU); the stage runs on CUDA when > 0.
        batch_size: images per call.
        torch_threads: intra-op threads per actor; 0 = one per whole CPU asked for (at least 1).
    """

    pool_size: int = 1
    max_pool_size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 4
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size: must be >= 1, got {self.pool_size}")
        if self.max_pool_size is not None and self.max_pool_size < self.pool_size:
            raise ValueError(f"max_pool_size: must be >= pool_size ({self.pool_size}), got {self.max_pool_size}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus/num_gpus: must be >= 0, got {self.num_cpus}/{self.num_gpus}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("num_cpus: an actor needs some CPU or GPU (both are 0)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads: must be >= 0, got {self.torch_threads}")

    def threads(self) -> int:
        return torch_threads(self.torch_threads, self.num_cpus)


@dataclass(frozen=True)
class CaptionerConfig:
    """BLIP captioner.

    Attributes:
        model: HF id or local directory of a ``BlipForConditionalGeneration`` + ``BlipProcessor``.
        fixed_prompt: if set, every image is grounded with this text and no captioner runs.
        prompt_prefix: conditional-captioning prefix (e.g. "a picture of"); removed from the caption.
        empty_caption_prompt: text used when the captioner returns nothing usable.
        max_new_tokens, num_beams: generation settings.
    """

    model: str = "Salesforce/blip-image-captioning-large"
    fixed_prompt: str | None = None
    prompt_prefix: str = ""
    empty_caption_prompt: str = "the main object"
    max_new_tokens: int = 20
    num_beams: int = 1
    resources: StageResources = field(default_factory=StageResources)

    def __post_init__(self) -> None:
        if self.fixed_prompt is not None and not self.fixed_prompt.strip():
            raise ValueError("fixed_prompt: must not be blank (use null to run the captioner)")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams: must be >= 1")


@dataclass(frozen=True)
class DetectorConfig:
    """GroundingDINO detector.

    Attributes:
        model: HF id or local directory of a ``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``.
        box_threshold: keep boxes whose score (max over caption tokens of the sigmoid logit) is >= this.
        text_threshold: token threshold of the HF post-processing (which caption words a box matched).
        max_boxes: at most this many boxes per image, best first, after NMS.
        nms_iou: boxes overlapping a better box by more than this IoU are dropped.
    """

    model: str = "IDEA-Research/grounding-dino-tiny"
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    max_boxes: int = 3
    nms_iou: float = 0.7
    resources: StageResources = field(default_factory=StageResources)

    def __post_init__(self) -> None:
        for name in ("box_threshold", "text_threshold", "nms_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must lie in [0, 1], got {getattr(self, name)}")
        if self.max_boxes < 1:
            raise ValueError(f"max_boxes: must be >= 1, got {self.max_boxes}")


@dataclass(frozen=True)
class SegmenterConfig:
    """SAM segmenter.

    Attributes:
        model: HF id or local directory of a ``SamModel`` + ``SamProcessor``.
        multimask: ask SAM for 3 masks per box and keep the one with the best predicted IoU (SAM's advice
            for ambiguous prompts); False = one mask per box (its advice for boxes).
        stability_offset: ``d`` of the stability score (logit units; SAM uses 1.0).
    """

    model: str = "facebook/sam-vit-base"
    multimask: bool = False
    stability_offset: float = 1.0
    resources: StageResources = field(default_factory=StageResources)

    def __post_init__(self) -> None:
        if self.stability_offset <= 0:
            raise ValueError(f"stability_offset: must be > 0, got {self.stability_offset}")


@dataclass(frozen=True)
class FoundationConfig:
    """The staged foundation teacher (the ``foundation`` block of a labelling config).

    Attributes:
        captioner, detector, segmenter: the three stages, each with its own model and pool resources.
        image_size: the side the labelling job decodes images to before the stages (its processors resize
            further as each model needs); labels are stored at the job's ``label_size`` (default this).
        local_files_only: never contact the hub (model fields must then be local dirs or cached ids).
        precision: ``fp32``, or ``fp16``/``bf16`` for the models on CUDA (CPU always runs fp32).
    """

    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    image_size: int = 512
    local_files_only: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size: must be >= 32, got {self.image_size}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision: expected fp32, fp16 or bf16, got {self.precision!r}")


def teacher_id(cfg: FoundationConfig) -> str:
    """What the label shards record as TEACHER, e.g. ``foundation(blip=...,gdino=...,sam=...)``."""
    first = (f"prompt={cfg.captioner.fixed_prompt!r}" if cfg.captioner.fixed_prompt is not None
             else f"blip={cfg.captioner.model}")
    return f"foundation({first},gdino={cfg.detector.model},sam={cfg.segmenter.model})"


# --- pure helpers (unit-tested without models) -------------------------------------------------------------

def caption_to_query(caption: str, prefix: str = "", fallback: str = "the main object") -> str:
    """A caption as GroundingDINO wants its text: lower case, the captioning prefix removed, one final '.'."""
    text = " ".join(str(caption).lower().split())
    pre = " ".join(prefix.lower().split())
    if pre and text.startswith(pre):
        text = text[len(pre):].strip()
    text = text.strip(" .,;:!?")
    if not text:
        text = " ".join(fallback.lower().split()).strip(" .")
    return f"{text}."


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    Args:
        boxes: (K, 4) x0, y0, x1, y1. scores: (K,). A box is dropped when its IoU with a kept, better box is
            greater than ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    for i in order:
        ok = True
        for j in keep:
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            inter = max(iw, 0.0) * max(ih, 0.0)
            union = area[i] + area[j] - inter
            if union > 0 and inter / union > iou_threshold:
                ok = False
                break
        if ok:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def stability_score(logits: np.ndarray, offset: float) -> float:
    """SAM's stability score ``|{L > +d}| / |{L > -d}|`` of one mask's logits (0 when nothing is > -d)."""
    hi = int((logits > offset).sum())
    lo = int((logits > -offset).sum())
    return hi / lo if lo else 0.0


def confidence_map(mask_logits: np.ndarray, box_scores: np.ndarray, pred_iou: np.ndarray,
                   stability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine K object masks into the pseudo mask ``p`` and the confidence ``c`` (module docstring).

    Args:
        mask_logits: (K, H, W) SAM logits per kept box. box_scores, pred_iou, stability: (K,).
    Returns:
        ``(p, c, q)``: (H, W) float32 probability, (H, W) float32 confidence in [0, 1], (K,) object quality.
    """
    if mask_logits.ndim != 3 or mask_logits.shape[0] == 0:
        raise ValueError(f"mask_logits must be (K>0, H, W), got {mask_logits.shape}")
    k = mask_logits.shape[0]
    for name, v in (("box_scores", box_scores), ("pred_iou", pred_iou), ("stability", stability)):
        if np.shape(v) != (k,):
            raise ValueError(f"{name} must have shape ({k},), got {np.shape(v)}")
    q = (np.clip(box_scores, 0, 1) * np.clip(pred_iou, 0, 1) * np.clip(stability, 0, 1)).astype(np.float32)
    probs = 1.0 / (1.0 + np.exp(-mask_logits.astype(np.float32)))
    owner = probs.argmax(axis=0)
    p = np.take_along_axis(probs, owner[None], axis=0)[0]
    c = q[owner] * np.abs(2.0 * p - 1.0)
    return p.astype(np.float32), np.clip(c, 0.0, 1.0).astype(np.float32), q


def foundation_fields():
    """The extra label-shard columns of foundation labels, as pyarrow fields (after the SOD label schema)."""
    import pyarrow as pa
    return [pa.field(schema.CONF_PNG, pa.binary()), pa.field(schema.CAPTION, pa.string()),
            pa.field(schema.BOXES, pa.list_(pa.float32())), pa.field(schema.BOX_SCORES, pa.list_(pa.float32())),
            pa.field(schema.MASK_SCORES, pa.list_(pa.float32()))]


def foundation_columns(batch: dict[str, Any], idx: np.ndarray) -> dict[str, list]:
    """The :func:`foundation_fields` values of rows ``idx`` of a Segmenter output batch (``CONF`` as PNG)."""
    from kd.imageio import encode_png

    def floats(col: str) -> list[list[float]]:
        return [np.asarray(batch[col][i], np.float32).reshape(-1).tolist() for i in idx]

    return {schema.CONF_PNG: [encode_png(np.asarray(batch[schema.CONF][i], np.uint8)) for i in idx],
            schema.CAPTION: [str(batch[schema.CAPTION][i]) for i in idx],
            schema.BOXES: floats(schema.BOXES), schema.BOX_SCORES: floats(schema.BOX_SCORES),
            schema.MASK_SCORES: floats(schema.MASK_SCORES)}
