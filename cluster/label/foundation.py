"""The stages of the foundation teacher (:mod:`cluster.foundation`: the method, its config and the confidence
map): :class:`Captioner`, :class:`Grounder` and :class:`Segmenter`, each a plain callable class over a batch, and
their composition -- one Ray Data actor pool per stage (:func:`foundation_stages`) or all three in this process
(:func:`label_batch_locally`)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from cluster.foundation import (CaptionerConfig, DetectorConfig, FoundationConfig, SegmenterConfig, StageResources,
                                caption_to_query, confidence_map, nms, stability_score, teacher_id)
from cluster.raypool import actor_pool
from kd import schema

log = logging.getLogger(__name__)

__all__ = ["Captioner", "Grounder", "Segmenter", "foundation_stages", "label_batch_locally"]

_HASH_COL = "fm_hashes"  # in-flight: "captioner=<h>;detector=<h>;" accumulated stage by stage


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# --- stage plumbing ------------------------------------------------------------------------------------------

def _device(resources: StageResources):
    import torch
    torch.set_num_threads(resources.threads())
    if resources.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    if resources.num_gpus > 0:
        log.warning("stage asks for %s GPU(s) but CUDA is not available here; running on CPU", resources.num_gpus)
    return torch.device("cpu")


def _dtype(precision: str, device):
    import torch
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def _model_hash(model) -> str:
    """sha256 (16 hex) over a model's parameters and buffers in state-dict order: which weights made a label."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _n(batch: dict[str, Any]) -> int:
    return len(batch[schema.ID])


def _ok_rows(batch: dict[str, Any]) -> list[int]:
    """Indices of rows not already rejected upstream (decode errors pass through every stage)."""
    reasons = batch.get(schema.REASON)
    if reasons is None:
        return list(range(_n(batch)))
    return [i for i, r in enumerate(reasons) if not r]


def _ensure_columns(batch: dict[str, Any]) -> dict[str, Any]:
    n = _n(batch)
    out = dict(batch)
    out.setdefault(schema.REASON, np.array([""] * n, dtype=object))
    out.setdefault(schema.DETAIL, np.array([""] * n, dtype=object))
    out[schema.REASON] = np.asarray(out[schema.REASON], dtype=object).copy()
    out[schema.DETAIL] = np.asarray(out[schema.DETAIL], dtype=object).copy()
    out.setdefault(_HASH_COL, np.array([""] * n, dtype=object))
    out[_HASH_COL] = np.asarray(out[_HASH_COL], dtype=object).copy()
    return out


def _image(batch: dict[str, Any], i: int) -> np.ndarray:
    img = np.asarray(batch[schema.IMAGE][i])
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{schema.IMAGE} of {batch[schema.KEY][i]!r}: expected uint8 HxWx3, "
                         f"got {img.dtype} {img.shape}")
    return img


# --- the three stages ------------------------------------------------------------------------------------------

class Captioner:
    """Stage 1: BLIP captions (or the fixed prompt) -> ``CAPTION`` (the text the detector grounds)."""

    def __init__(self, cfg: CaptionerConfig, local_files_only: bool = False, precision: str = "fp32"):
        self.cfg = cfg
        self.model = None
        self.hash = "fixed"
        if cfg.fixed_prompt is not None:
            return
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = _device(cfg.resources)
        self.processor = BlipProcessor.from_pretrained(cfg.model, local_files_only=local_files_only)
        self.model = BlipForConditionalGeneration.from_pretrained(
            cfg.model, local_files_only=local_files_only).eval()
        self.hash = _model_hash(self.model)
        self.model.to(self.device, _dtype(precision, self.device))
        self.dtype = next(self.model.parameters()).dtype

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = _ensure_columns(batch)
        n = _n(batch)
        captions = np.array([""] * n, dtype=object)
        rows = _ok_rows(out)
        if self.model is None:
            for i in rows:
                captions[i] = self.cfg.fixed_prompt
        elif rows:
            images = [_image(batch, i) for i in rows]
            kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
            if self.cfg.prompt_prefix:
                kwargs["text"] = [self.cfg.prompt_prefix] * len(images)
            inputs = self.processor(**kwargs)
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens,
                                          num_beams=self.cfg.num_beams)
            for i, text in zip(rows, self.processor.batch_decode(ids, skip_special_tokens=True)):
                captions[i] = text.strip()
        out[schema.CAPTION] = captions
        out[_HASH_COL] = np.array([f"{h}captioner={self.hash};" for h in out[_HASH_COL]], dtype=object)
        return out


class Grounder:
    """Stage 2: GroundingDINO boxes for the caption -> ``BOXES`` (original-image pixels), ``BOX_SCORES``.

    Rows without any box >= ``box_threshold`` get ``REASON = "no_detection"``.
    """

    def __init__(self, cfg: DetectorConfig, captioner: CaptionerConfig, local_files_only: bool = False,
                 precision: str = "fp32"):
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        self.cfg, self.captioner = cfg, captioner
        self.device = _device(cfg.resources)
        self.processor = GroundingDinoProcessor.from_pretrained(cfg.model, local_files_only=local_files_only)
        self.model = GroundingDinoForObjectDetection.from_pretrained(
            cfg.model, local_files_only=local_files_only).eval()
        self.hash = _model_hash(self.model)
        self.model.to(self.device, _dtype(precision, self.device))
        self.dtype = next(self.model.parameters()).dtype
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = _ensure_columns(batch)
        n = _n(batch)
        boxes_col = [np.zeros(0, np.float32) for _ in range(n)]
        scores_col = [np.zeros(0, np.float32) for _ in range(n)]
        rows = _ok_rows(out)
        if rows:
            images = [_image(batch, i) for i in rows]
            queries = [caption_to_query(batch[schema.CAPTION][i], self.captioner.prompt_prefix,
                                        self.captioner.empty_caption_prompt) for i in rows]
            inputs = self.processor(images=images, text=queries, return_tensors="pt", padding="longest",
                                    truncation=True, max_length=self.max_text_len)
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            with torch.inference_mode():
                outputs = self.model(**inputs)
            sizes = [img.shape[:2] for img in images]
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.cfg.box_threshold,
                text_threshold=self.cfg.text_threshold, target_sizes=sizes)
            for i, img, query, res in zip(rows, images, queries, results):
                h, w = img.shape[:2]
                b = res["boxes"].float().cpu().numpy().reshape(-1, 4)
                s = res["scores"].float().cpu().numpy().reshape(-1)
                b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
                b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
                valid = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
                b, s = b[valid], s[valid]
                keep = nms(b, s, self.cfg.nms_iou)[: self.cfg.max_boxes]
                if keep.size == 0:
                    out[schema.REASON][i] = "no_detection"
                    out[schema.DETAIL][i] = (f"no box scored >= {self.cfg.box_threshold} for {query!r}")
                    continue
                sx = float(batch[schema.ORIG_W][i]) / w
                sy = float(batch[schema.ORIG_H][i]) / h
                orig = b[keep] * np.array([sx, sy, sx, sy], np.float32)
                boxes_col[i] = orig.astype(np.float32).reshape(-1)
                scores_col[i] = s[keep].astype(np.float32)
        out[schema.BOXES] = _object_array(boxes_col)
        out[schema.BOX_SCORES] = _object_array(scores_col)
        out[_HASH_COL] = np.array([f"{h}detector={self.hash};" for h in out[_HASH_COL]], dtype=object)
        return out


class Segmenter:
    """Stage 3: SAM masks for the boxes -> ``LABEL`` (pseudo mask), ``CONF`` (confidence map), provenance.

    ``p`` and ``c`` are computed at the size of ``IMAGE``, then resized to the square ``label_size`` (as a SOD
    teacher's labels are) and quantised to uint8 (``round(255 x)``). The per-image summary follows the SOD
    teacher's: ``conf_mean = mean |2p - 1|``, ``conf_frac = mean [p < 0.1 or p > 0.9]``,
    ``fg_frac = mean [p > 0.5]``. The ``image`` column is dropped.
    """

    def __init__(self, cfg: SegmenterConfig, teacher: str, label_size: int, local_files_only: bool = False,
                 precision: str = "fp32"):
        from transformers import SamModel, SamProcessor

        if label_size < 1:
            raise ValueError(f"label_size: must be >= 1, got {label_size}")
        self.cfg, self.teacher, self.label_size = cfg, teacher, int(label_size)
        self.device = _device(cfg.resources)
        self.processor = SamProcessor.from_pretrained(cfg.model, local_files_only=local_files_only)
        self.model = SamModel.from_pretrained(cfg.model, local_files_only=local_files_only).eval()
        self.hash = _model_hash(self.model)
        self.model.to(self.device, _dtype(precision, self.device))
        self.dtype = next(self.model.parameters()).dtype

    def _segment(self, embedding, img: np.ndarray, boxes_img: np.ndarray, reshaped: tuple[int, int]):
        """SAM on one image: (K, 4) boxes in IMAGE pixels -> (K, H, W) logits, (K,) predicted IoU."""
        import torch

        h, w = img.shape[:2]
        rh, rw = reshaped
        scale = np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        prompt = torch.from_numpy(boxes_img * scale)[None].to(self.device, self.dtype)  # (1, K, 4)
        with torch.inference_mode():
            res = self.model(image_embeddings=embedding, input_boxes=prompt,
                             multimask_output=self.cfg.multimask)
        iou = res.iou_scores[0].float()                                 # (K, M)
        best = iou.argmax(dim=-1)                                       # (K,)
        masks = self.processor.image_processor.post_process_masks(
            res.pred_masks.float().cpu(), [[h, w]], [[rh, rw]], binarize=False)[0]  # (K, M, h, w) logits
        k = torch.arange(masks.shape[0])
        return masks[k, best.cpu()].numpy(), iou[k, best].cpu().numpy()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = _ensure_columns(batch)
        n, size = _n(batch), self.label_size
        labels = np.zeros((n, size, size), np.uint8)
        confs = np.zeros((n, size, size), np.uint8)
        stats = np.full((n, 3), np.nan, np.float32)
        quality = [np.zeros(0, np.float32) for _ in range(n)]
        rows = _ok_rows(out)
        if rows:
            images = [_image(batch, i) for i in rows]
            inputs = self.processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                emb = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
            for j, (i, img) in enumerate(zip(rows, images)):
                h, w = img.shape[:2]
                flat = np.asarray(batch[schema.BOXES][i], np.float32).reshape(-1, 4)
                sx = w / float(batch[schema.ORIG_W][i])
                sy = h / float(batch[schema.ORIG_H][i])
                boxes_img = flat * np.array([sx, sy, sx, sy], np.float32)
                reshaped = tuple(int(v) for v in inputs["reshaped_input_sizes"][j])
                logits, iou = self._segment(emb[j:j + 1], img, boxes_img, reshaped)
                stab = np.array([stability_score(m, self.cfg.stability_offset) for m in logits], np.float32)
                p, c, q = confidence_map(logits, np.asarray(batch[schema.BOX_SCORES][i], np.float32), iou, stab)
                p, c = _resize_maps(np.stack([p, c]), size)
                labels[i], confs[i], quality[i] = _to_uint8(p), _to_uint8(c), q
                stats[i] = (np.abs(2.0 * p - 1.0).mean(), ((p < 0.1) | (p > 0.9)).mean(), (p > 0.5).mean())
        out.pop(schema.IMAGE, None)
        out[schema.LABEL] = labels
        out[schema.CONF] = confs
        out[schema.CONF_MEAN], out[schema.CONF_FRAC], out[schema.FG_FRAC] = stats[:, 0], stats[:, 1], stats[:, 2]
        out[schema.MASK_SCORES] = _object_array(quality)
        hashes = [f"{h}segmenter={self.hash};" for h in out.pop(_HASH_COL)]
        out[schema.TEACHER] = np.array([self.teacher] * n, dtype=object)
        out[schema.WEIGHTS_HASH] = np.array([hashlib.sha256(h.encode()).hexdigest()[:16] for h in hashes],
                                            dtype=object)
        out[schema.TTA] = np.array(["none"] * n, dtype=object)
        return out


def _resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) float maps in [0, 1] -> (C, size, size), bilinear (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    if maps.shape[1:] == (size, size):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[None]
    shrink = size < max(maps.shape[1:])
    r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return r[0].clamp_(0.0, 1.0).numpy()


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


# --- composition -----------------------------------------------------------------------------------------------

def _map(ds, cls, res: StageResources, **kwargs):
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, compute=actor_pool(res.pool_size, res.max_pool_size),
                          batch_size=res.batch_size, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                          batch_format="numpy", zero_copy_batch=False)


def _fixed_caption(batch: dict[str, Any], cfg: CaptionerConfig) -> dict[str, Any]:
    return Captioner(cfg)(batch)


def foundation_stages(ds, cfg: FoundationConfig, label_size: int | None = None):
    """Append the three stages to a Ray Dataset of decoded images, each in its own actor pool.

    With a ``fixed_prompt`` the captioner is a cheap task-based ``map_batches`` (no model, no pool).
    ``label_size`` defaults to ``cfg.image_size``.
    """
    common = {"local_files_only": cfg.local_files_only, "precision": cfg.precision}
    if cfg.captioner.fixed_prompt is not None:
        ds = ds.map_batches(_fixed_caption, fn_kwargs={"cfg": cfg.captioner}, batch_format="numpy",
                            batch_size=cfg.captioner.resources.batch_size, zero_copy_batch=False,
                            num_cpus=min(cfg.captioner.resources.num_cpus, 0.25) or 0.25)
    else:
        ds = _map(ds, Captioner, cfg.captioner.resources, cfg=cfg.captioner, **common)
    ds = _map(ds, Grounder, cfg.detector.resources, cfg=cfg.detector, captioner=cfg.captioner, **common)
    return _map(ds, Segmenter, cfg.segmenter.resources, cfg=cfg.segmenter, teacher=teacher_id(cfg),
                label_size=label_size or cfg.image_size, **common)


def label_batch_locally(batch: dict[str, Any], cfg: FoundationConfig,
                        label_size: int | None = None) -> dict[str, Any]:
    """The three stages in this process, one after the other (unit tests, debugging one image)."""
    common = {"local_files_only": cfg.local_files_only, "precision": cfg.precision}
    batch = Captioner(cfg.captioner, **common)(batch)
    batch = Grounder(cfg.detector, cfg.captioner, **common)(batch)
    return Segmenter(cfg.segmenter, teacher_id(cfg), label_size or cfg.image_size, **common)(batch)
