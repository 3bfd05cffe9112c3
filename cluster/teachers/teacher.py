"""The teacher interface (:class:`Teacher`: uint8 images in, probabilities and views out) and its forms: a
registered model run eagerly, an exported ONNX / torch.export / TorchScript file, a third-party file run as its
card says; :class:`Ensemble` and :class:`HFlipTTA` average several views."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster.teachers.spec import EnsembleConfig, TeacherSpecError

__all__ = ["Teacher", "EagerTeacher", "TorchScriptTeacher", "ExportTeacher", "OnnxTeacher", "CardTeacher", "Ensemble",
           "HFlipTTA", "logit_mean"]


class Teacher:
    """A frozen saliency teacher: uint8 images in, probabilities out.

    Attributes:
        id: which teacher (``scfnet_r50``, ``torchscript:scfnet_r50``, ``ensemble(a,b)``).
        weights_hash: sha256 (16 hex) of the file(s) it runs.
        input_size: the square size S its images must have.
        mean, std: RGB statistics in 0..255 units (its preprocessing).
        device: where its outputs live.
    """

    id: str
    weights_hash: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float32 (N, 3, H, W) RGB in 0..255 on any device -> float32 (N, H, W) on ``self.device``."""
        raise NotImplementedError

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(probs(x), views(x))`` from one forward pass; ``probs`` is computed exactly as :meth:`probs` does.

        A single network has one view, its probabilities (the same tensor, no copy).
        """
        p = self.probs(x)
        return p, [p]

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (N, H, W) maps on ``self.device`` whose mean is ``probs(x)``: one per ensemble member and flip."""
        return self.probs_views(x)[1]

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) in 0..255 on ``self.device`` (one copy to the device)."""
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():  # Ray hands out read-only batches; we only read them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(np.ascontiguousarray(images))
        else:
            t = images
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"{self.id}: expected uint8 images (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
        return t.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()

    @torch.inference_mode()
    def predict_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 probabilities (N, S, S) on ``self.device``."""
        return self.probs(self.to_input(images))

    @torch.inference_mode()
    def predict_views(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """uint8 (N, S, S, 3) -> ``(probabilities, views)`` (:meth:`probs_views`), one forward pass."""
        return self.probs_views(self.to_input(images))

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, S, S, 3) at the teacher's size -> float32 (N, S, S) saliency probabilities in [0, 1]."""
        return self.predict_tensor(images).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "weights_hash": self.weights_hash, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std), "device": str(self.device)}


class _SingleTeacher(Teacher):
    """Shared preprocessing of one network: resize to its size if needed, normalise, run, resize back."""

    def __init__(self, id: str, weights_hash: str, mean: Sequence[float], std: Sequence[float],
                 input_size: int, device: torch.device, half: bool):
        self.id, self.weights_hash, self.input_size = id, weights_hash, int(input_size)
        self.mean = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise TeacherSpecError(f"{id}: bad preprocessing mean={self.mean} std={self.std}")
        self.device, self.half = device, half
        self.out_resize = "bilinear"
        self._mean_t = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._inv_std_t = 1.0 / torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) -> probabilities (N, 1, S, S)."""
        raise NotImplementedError

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        h, w = x.shape[-2:]
        s = self.input_size
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        xn = (x - self._mean_t) * self._inv_std_t
        p = self._run(xn.half() if self.half else xn).float()
        if (h, w) != (s, s):
            p = (F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) if self.out_resize == "bilinear"
                 else F.interpolate(p, size=(h, w), mode="nearest"))
        return p[:, 0]


class EagerTeacher(_SingleTeacher):
    """A registered ``SODModel`` in PyTorch eager mode (``model.predict``)."""

    def __init__(self, model: nn.Module, id: str, weights_hash: str, device: torch.device, half: bool,
                 input_size: int | None = None):
        super().__init__(id, weights_hash, model.mean, model.std, input_size or model.input_size, device, half)
        self.model = model.to(device).eval()
        if half:
            self.model.half()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.model.predict(xn)


class TorchScriptTeacher(_SingleTeacher):
    """A TorchScript module from :func:`export_teacher` (normalised image -> probabilities)."""

    def __init__(self, module: torch.jit.ScriptModule, meta: dict[str, Any], id: str, weights_hash: str,
                 device: torch.device, half: bool):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], device, half)
        self.meta = meta
        self.module = module.to(device).eval()
        if half:
            self.module.half()

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.module(xn)


class ExportTeacher(_SingleTeacher):
    """A torch.export program from :func:`export_teacher` (normalised image -> probabilities), run in float32.

    ``program.module()`` is a graph module: it has no train/eval mode (the graph was captured in eval mode) and is
    only moved to the device (half precision would need a program exported in it)."""

    def __init__(self, module: nn.Module, meta: dict[str, Any], id: str, weights_hash: str, device: torch.device):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], device, False)
        self.meta = meta
        self.module = module.to(device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.meta.get("precision", "fp32")}

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.module(xn)


class OnnxTeacher(_SingleTeacher):
    """An ONNX model from :func:`export_teacher`, run by onnxruntime.

    Its tensors live on the CPU (onnxruntime copies them to the GPU itself when it runs the CUDA provider);
    it runs in the precision the file was exported in (float32).
    """

    def __init__(self, session: Any, meta: dict[str, Any], id: str, weights_hash: str):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], torch.device("cpu"), False)
        self.meta = meta
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.providers = session.get_providers()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.meta.get("precision", "fp32"), "providers": self.providers}

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(xn.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)


class CardTeacher(_SingleTeacher):
    """A model file sodkd did not write (ONNX, TorchScript or torch.export), run as its teacher card says.

    ``runner(x: np.ndarray float32) -> list of np.ndarray`` runs the file on the prepared input (the card's
    layout and channel order); the first batch is checked against the card (:func:`kd.card.check_first_batch`)
    and every batch's map is selected, turned into probabilities and resized to the input size as the card says.
    """

    def __init__(self, runner, card, id: str, weights_hash: str, input_size: int | None, device: torch.device,
                 card_uri: str):
        size = int(input_size or card.input.size)
        try:
            card.input.check_size(size)
        except Exception as e:  # ConfigError: name the card
            raise TeacherSpecError(f"{id}: {card_uri}: {e}") from e
        mean, std = card.input.mean_std_255()
        super().__init__(id, weights_hash, mean, std, size, device, False)
        self.card, self.card_uri, self.runner = card, card_uri, runner
        self.out_resize = card.output.resize
        self._checked = False

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        from kd.card import check_first_batch, select_maps
        c = self.card
        x = xn.flip(1) if c.input.channels == "BGR" else xn
        if c.input.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        outs = [np.asarray(o) for o in self.runner(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))]
        n, s = xn.shape[0], xn.shape[-1]
        if not self._checked:
            maps = check_first_batch(outs, c, n, (s, s), f"teacher {self.id} (card {self.card_uri})")
            self._checked = True
        else:
            maps = select_maps(outs, c)
        p = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None].to(self.device)
        if p.shape[-2:] != (s, s):
            p = (F.interpolate(p, size=(s, s), mode="bilinear", align_corners=False) if self.out_resize == "bilinear"
                 else F.interpolate(p, size=(s, s), mode="nearest"))
        return p

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "card": self.card_uri, "licence": self.card.licence}


_CLIP = 1e-4    # logit combination: probabilities clipped to [_CLIP, 1 - _CLIP]


def logit_mean(maps: Sequence[torch.Tensor], weights: Sequence[float], scale: float = 1.0) -> torch.Tensor:
    """``sigmoid(scale * sum_k w_k logit(p_k))`` of probability maps (each clipped to [1e-4, 1 - 1e-4]): the
    logit combination of :class:`EnsembleConfig`; ``scale`` > 1 sharpens the result (benchmarks score labels at
    the sharpness the students learn)."""
    z = sum(w * torch.logit(p.float(), eps=_CLIP) for w, p in zip(weights, maps))
    return torch.sigmoid(scale * z)


class Ensemble(Teacher):
    """The members' probabilities combined as :class:`EnsembleConfig` says; by default their mean,
    ``p = (1/K) * sum_k p_k``.

    Members may have different input sizes: the ensemble works at the first member's size and each member
    resizes its input and output itself. ``weights_hash`` hashes the members' hashes in order (and the
    combination, where it is not the plain mean). Its views are the members' views: the disagreement the
    labelling job measures is the members', whatever the combination.
    """

    def __init__(self, members: Sequence[Teacher], config: EnsembleConfig | None = None):
        if len(members) < 2:
            raise ValueError("Ensemble: needs at least two teachers")
        self.members = list(members)
        self.config = config or EnsembleConfig()
        self.config.check_members(len(self.members))
        k = len(self.members)
        w = self.config.weights or (1.0,) * k
        self.weights = tuple(x / sum(w) for x in w)
        first = self.members[0]
        ids = ",".join(m.id for m in self.members)
        key = ":".join(m.weights_hash for m in self.members)
        if self.config.is_default:
            self.id = f"ensemble({ids})"
        else:
            how = f"{self.config.combine};" + ",".join(f"{x:.4g}" for x in self.weights)
            self.id = f"ensemble[{how}]({ids})"
            key += f"|{how}"
        self.weights_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.input_size, self.mean, self.std, self.device = first.input_size, first.mean, first.std, first.device

    def _combine(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.config.combine == "logit":
            return logit_mean(maps, self.weights)
        if self.config.is_default:
            return sum(maps) / len(maps)
        return sum(w * p for w, p in zip(self.weights, maps))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine([m.probs(x).to(self.device) for m in self.members])

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The combination as :meth:`probs` computes it, and the members' views concatenated (in member order)."""
        ps, views = [], []
        for m in self.members:
            p, vs = m.probs_views(x)
            ps.append(p.to(self.device))
            views.extend(v.to(self.device) for v in vs)
        return self._combine(ps), views

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["members"] = [m.describe() for m in self.members]
        if not self.config.is_default:
            d["ensemble"] = {"combine": self.config.combine, "weights": list(self.weights)}
        return d


class HFlipTTA(Teacher):
    """Horizontal-flip test-time augmentation: ``p = (t(x) + flip(t(flip(x)))) / 2``, one batched forward.

    The id and hash are the wrapped teacher's; the label shards record the TTA in their own column.
    """

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        for attr in ("id", "weights_hash", "input_size", "mean", "std", "device"):
            setattr(self, attr, getattr(teacher, attr))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p = self.teacher.probs(torch.cat([x, x.flip(-1)], dim=0))
        return 0.5 * (p[:n] + p[n:].flip(-1))

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mean as :meth:`probs` computes it; views: the wrapped teacher's views of ``x``, then its views of
        ``flip(x)`` flipped back (one batched forward over both)."""
        n = x.shape[0]
        p, vs = self.teacher.probs_views(torch.cat([x, x.flip(-1)], dim=0))
        return 0.5 * (p[:n] + p[n:].flip(-1)), [v[:n] for v in vs] + [v[n:].flip(-1) for v in vs]

    def describe(self) -> dict[str, Any]:
        return {**self.teacher.describe(), "tta": "hflip"}
