"""Teachers for offline labelling: what a teacher spec names, how it is loaded, how it predicts.

A *teacher spec* is one string, the form the CLI and configs use:

- ``NAME:WEIGHTS`` -- a model of the registry (``models.create_model``) with a weights file written by
  ``models.save_weights`` (or a bare state dict), e.g. ``scfnet_r50:/ckpt/teacher.pt`` or
  ``scfnet_r50:s3://bucket/teachers/r50.pt``;
- ``FILE.onnx`` -- an ONNX model written by :func:`cluster.export.export_teacher`, run by onnxruntime (CUDA provider when
  one is available and asked for, else CPU);
- ``FILE.pt2`` -- a torch.export program written by :func:`cluster.export.export_teacher` (``torch.export.load``);
- ``FILE.ts`` / ``FILE.torchscript`` -- a TorchScript module that older sodkd releases wrote (still read, with a
  DeprecationWarning; sodkd no longer writes TorchScript);
- any of these file kinds written by someone else, run as its teacher card says (``FILE.card.yaml``, kd/card.py).
  ``sodkd export`` writes such a card beside every file it exports;
- ``models:/NAME/VERSION`` (or ``models:/NAME/latest``, ``models:/NAME@ALIAS``) -- a model of the MLflow
  registry that training logged (the ONNX flavour: an exported file and its card, no pickle): downloaded
  through MLflow's artifact download (:mod:`cluster.registry`; tracking URI: ``MLFLOW_TRACKING_URI`` or
  the process's ``mlflow.set_tracking_uri``) and loaded as that file.

Every teacher declares its preprocessing: RGB mean and std in 0..255 units and the square input size. A
registered model carries them as attributes; an exported file carries them as JSON metadata (ONNX
``metadata_props``, ``.pt2`` / TorchScript extra files) next to the graph, so labelling never guesses them. Exported
graphs take the *normalised* image ``(x - mean) / std`` (N, 3, S, S) and return probabilities (N, 1, S, S),
the sigmoid of the finest side output -- the same quantity ``SODModel.predict`` returns, so the three forms
of one set of weights give the same labels (tested).

:class:`Teacher` is the common interface: ``predict(uint8 N x S x S x 3) -> float32 N x S x S`` probabilities.
:class:`Ensemble` averages the probabilities of several teachers (or, as its
:class:`EnsembleConfig` says, weights them or averages them in logit space: a second-round teacher) and
:class:`HFlipTTA` averages a teacher with its prediction on the mirrored image (flipped back) -- both beyond the
paper, both cheap gains in label quality. On CUDA the torch forms run in half precision unless ``precision="fp32"``.

The maps such a mean is taken over are the teacher's *views*: ``views(x)`` returns them (a list of (N, H, W)
maps whose mean is ``probs(x)``; one view for a single network, the members' views concatenated for an
ensemble, the views of ``x`` then the flipped-back views of ``flip(x)`` for hflip TTA), and
``probs_views(x)`` returns both from the same forward pass. The labelling job measures how far the views
disagree per image (:mod:`cluster.label`).

Every teacher also has an ``id`` (which model, which form) and a ``weights_hash`` (sha256 of the file it runs,
16 hex chars) that the label shards record, so a label can always be traced to the weights that made it.

The modules: :mod:`~cluster.teachers.spec` (what a spec names; the metadata an exported file carries),
:mod:`~cluster.teachers.teacher` (the interface and its forms, :class:`Ensemble`, :class:`HFlipTTA`) and
:mod:`~cluster.teachers.loading` (spec -> teacher). Writing such files is :mod:`cluster.export`.
"""

from cluster.teachers.loading import build_teacher, load_teacher
from cluster.teachers.spec import (CARD_QUERY, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_SUFFIXES, METADATA_KEY,
                                   ONNX_SUFFIXES, REGISTRY_PREFIX, TORCHSCRIPT_SUFFIXES, EnsembleConfig, TeacherSpec,
                                   TeacherSpecError, is_registry_spec, parse_teacher_spec, resolve_registry_spec,
                                   weights_hash)
from cluster.teachers.teacher import (CardTeacher, Ensemble, EagerTeacher, ExportTeacher, HFlipTTA, OnnxTeacher,
                                      Teacher, TorchScriptTeacher)

__all__ = [
    "TeacherSpec", "TeacherSpecError", "parse_teacher_spec", "Teacher", "EagerTeacher", "TorchScriptTeacher",
    "ExportTeacher", "OnnxTeacher", "CardTeacher", "Ensemble", "EnsembleConfig", "HFlipTTA", "load_teacher",
    "build_teacher", "weights_hash", "METADATA_KEY", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "CARD_QUERY",
    "TORCHSCRIPT_SUFFIXES", "ONNX_SUFFIXES", "EXPORT_SUFFIXES", "REGISTRY_PREFIX", "is_registry_spec",
    "resolve_registry_spec",
]
