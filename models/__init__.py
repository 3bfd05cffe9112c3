"""sodkd models: pure PyTorch saliency networks behind a name registry.

    from models import create_model, list_models, save_weights, load_weights, load_backbone_weights
    student = create_model("scfnet_m3")
    load_backbone_weights(student, "mobilenet_v3_large_x0.5.pth")   # optional ImageNet encoder init
    logits = student(student.normalize(images_uint8))   # 4 side outputs, finest first

This package imports nothing else of sodkd and never Ray or MLflow.
"""

from .backbone_weights import BackboneLoadReport, BackboneWeightsError, load_backbone_weights
from .base import SODModel
from .complexity import count_macs, count_params
from .registry import UnknownModelError, create_model, describe_model, list_models, register_model
from .weights import WeightsFormatError, extra_metadata, load_state, load_weights, read_metadata, save_weights

# Model families register their variants on import.
from . import scfnet  # noqa: E402,F401  isort: skip
from . import dedecoder  # noqa: E402,F401  isort: skip
from . import video_student  # noqa: E402,F401  isort: skip

__all__ = [
    "SODModel", "register_model", "create_model", "list_models", "describe_model", "UnknownModelError",
    "save_weights", "load_weights", "load_state", "read_metadata", "extra_metadata", "WeightsFormatError",
    "count_params", "count_macs",
    "load_backbone_weights", "BackboneLoadReport", "BackboneWeightsError",
]
