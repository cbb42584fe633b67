"""Reference LGD models in plain PyTorch, and the registry that names them."""

from .blocks import BasicBlock2d, Bottleneck2d, LGDBlock, P3DBasicBlock, P3DBottleneck, p3d_variant
from .fast import FastLGD2D, FastLGD3D, to_fast
from .heads import KernelClassifier, TensorSketch
from .networks import LGD2D, LGD3D, LGDNet
from .p3d import FastP3DBasicBlock, FastP3DBottleneck, to_fast_unit
from .registry import FastPathUnavailableError, create_model, list_models, model_entry

__all__ = [
    "LGD2D",
    "LGD3D",
    "BasicBlock2d",
    "Bottleneck2d",
    "FastLGD2D",
    "FastLGD3D",
    "FastP3DBasicBlock",
    "FastP3DBottleneck",
    "FastPathUnavailableError",
    "KernelClassifier",
    "LGDBlock",
    "LGDNet",
    "P3DBasicBlock",
    "P3DBottleneck",
    "TensorSketch",
    "create_model",
    "list_models",
    "model_entry",
    "p3d_variant",
    "to_fast",
    "to_fast_unit",
]
