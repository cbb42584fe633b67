"""lgd_fast's fused ops: each has a plain PyTorch ``<op>_reference`` and a public ``<op>`` that picks a backend."""

from ._backend import choose_backend, extension_available, extension_error
from .bn_relu_max_pool import bn_relu_max_pool, bn_relu_max_pool_reference
from .diffusion_epilogue import diffusion_epilogue, diffusion_epilogue_reference
from .global_avg_pool import global_avg_pool, global_avg_pool_reference
from .global_update import global_update, global_update_reference
from .p3d_conv import p3d_conv, p3d_conv_reference
from .squeeze_excite import squeeze_excite, squeeze_excite_reference
from .stem_conv_pool import stem_conv_pool, stem_conv_pool_reference
from .to_channels_last import to_channels_last_3d, to_channels_last_3d_reference

__all__ = [
    "bn_relu_max_pool",
    "bn_relu_max_pool_reference",
    "choose_backend",
    "diffusion_epilogue",
    "diffusion_epilogue_reference",
    "extension_available",
    "extension_error",
    "global_avg_pool",
    "global_avg_pool_reference",
    "global_update",
    "global_update_reference",
    "p3d_conv",
    "p3d_conv_reference",
    "squeeze_excite",
    "squeeze_excite_reference",
    "stem_conv_pool",
    "stem_conv_pool_reference",
    "to_channels_last_3d",
    "to_channels_last_3d_reference",
]
