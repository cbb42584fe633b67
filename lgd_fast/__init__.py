"""lgd_fast: fast, faithful PyTorch LGD (Local and Global Diffusion, CVPR 2019) video networks."""

from . import ops  # registers the compiled ops' fake kernels and autograd with torch.library
from .arena import activation_arena, arena_stats, release_arena
from .convert import ConversionReport, convert
from .models import FastPathUnavailableError, create_model, list_models
from .recorded import RecordedInference, recorded_programs
from .weights import LoadReport, inflate_imagenet, load_author_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "FastPathUnavailableError",
    "LoadReport",
    "RecordedInference",
    "__version__",
    "activation_arena",
    "arena_stats",
    "convert",
    "create_model",
    "inflate_imagenet",
    "list_models",
    "load_author_checkpoint",
    "ops",
    "recorded_programs",
    "release_arena",
]
