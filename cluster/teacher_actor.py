"""The teacher actor: one class behind offline labelling and online distillation.

Both Ray Data stages that run a teacher over decoded images -- :class:`cluster.label.stages.TeacherLabeler`
(``sodkd label``: label shards with confidence statistics) and :class:`cluster.training.data.OnlineLabeler`
(``distill`` with an online teacher: the ``target`` column the trainer reads) -- are this actor with a
different output. It loads the teacher (:func:`cluster.teachers.build_teacher`: any spec, ensemble, flip TTA)
once per actor with ``threads`` intra-op threads -- a weights file on the inference engine's backend
(``backend``, :func:`cluster.predictor.runtime_teacher`: ONNX Runtime on a CPU by default, as ``sodkd predict``) --
and :meth:`TeacherActor.maps` gives the probabilities at the
size the caller asks for (bilinear, antialiased when it shrinks) together with the spread of the teacher's
views, all from one forward pass:

    disagreement = mean over pixels of (1/V) sum_v |v - p|     (None when V = 1)

where ``v`` are the ensemble members x flips at the teacher's resolution and ``p`` their mean.

It sits beside the :mod:`cluster.teachers` package rather than in it so that importing the labelling stages
(whose decode tasks run in many small Ray workers) does not import PyTorch: the teacher package is imported
when an actor starts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cluster.storage import S3Config
from cluster.teachers.spec import EnsembleConfig

__all__ = ["TeacherActor"]


class TeacherActor:
    """A teacher loaded once per Ray actor; :meth:`maps` runs it on a batch of decoded images."""

    def __init__(self, teachers: Sequence[str], *, s3: S3Config | None = None, tta: str = "none",
                 teacher_size: int | None = None, device: str = "auto", precision: str = "auto", threads: int = 1,
                 backend: str = "auto", ensemble: EnsembleConfig | None = None):
        import torch

        from cluster.predictor import runtime_teacher
        from cluster.teachers import build_teacher
        if threads:
            torch.set_num_threads(int(threads))
        self.teacher = build_teacher(list(teachers), tta=tta, s3=s3, device=device, precision=precision,
                                     input_size=teacher_size, threads=threads or None,
                                     convert=lambda t: runtime_teacher(t, backend, threads or None),
                                     ensemble=ensemble)
        self.tta = tta

    def maps(self, images: np.ndarray, size: int, views: bool = False):
        """``(p, disagreement)``: ``p`` a ``(N, size, size)`` float tensor in [0, 1] on the teacher's device;
        ``disagreement`` a ``(N,)`` float32 array when ``views`` and the teacher has more than one view, else None."""
        import torch
        import torch.nn.functional as F
        spread = None
        with torch.inference_mode():
            if views:
                p, vs = self.teacher.predict_views(images)
                if len(vs) > 1:
                    spread = (sum((v - p).abs_().mean((1, 2)) for v in vs) / len(vs)).float().cpu().numpy()
                del vs
            else:
                p = self.teacher.predict_tensor(images)
            if p.shape[-1] != size or p.shape[-2] != size:
                p = F.interpolate(p[:, None], size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=size < p.shape[-1])[:, 0].clamp_(0.0, 1.0)
        return p, spread
