"""Loading weights from files on disk: the author's LGD-3D checkpoints and 2-D ImageNet ResNets.

Checkpoints are untrusted input: every file is read with ``torch.load(..., weights_only=True)``.
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .models.blocks import P3DBasicBlock, P3DBottleneck
from .models.networks import LGD2D, LGD3D

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "net", "module")
# Keys our models may have that no author checkpoint or ImageNet ResNet carries.
_OWN_PREFIXES = ("kernel_head.",)


@dataclass
class LoadReport:
    """What a load did: tensors copied, initialised otherwise, or left over in the source."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the source lacks (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # source keys the model has no place for
    mismatched: list[str] = field(default_factory=list)  # "key: model shape vs source shape"
    initialised: dict[str, str] = field(default_factory=dict)  # model key -> how it was set instead
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> why it was not used

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, items in (
            ("missing from the source", self.missing),
            ("unexpected in the source", self.unexpected),
            ("with the wrong shape", self.mismatched),
        ):
            if items:
                lines.append(f"{len(items)} {title}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        for title, items in (("initialised", self.initialised), ("skipped", self.skipped)):
            reasons: dict[str, list[str]] = {}
            for key, why in items.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                lines.append(f"{title} ({why}): {len(keys)} tensors, e.g. {keys[0]}")
        return "\n".join(lines)


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from a file path or an in-memory dict.

    Unwraps training checkpoints (``{"model": state_dict, "optimizer": ...}`` and similar) and strips the
    ``module.`` prefix that DataParallel/DistributedDataParallel add.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} is not a weights-only checkpoint (it holds objects other than tensors and plain "
                f"containers, which lgd_fast refuses to unpickle): {str(err).splitlines()[0]}"
            ) from None
        except Exception as err:  # corrupt bytes fail anywhere in the unpickler (EOFError, IndexError, KeyError...)
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    else:
        obj, path = source, "<state_dict>"
    obj = _unwrap(obj, path)
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _unwrap(obj, path: str) -> Mapping[str, torch.Tensor]:
    for _ in range(3):  # checkpoints nest at most a couple of levels
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise ValueError(
        f"{path} holds no state_dict: expected a mapping of names to tensors, possibly under one of "
        f"{_WRAPPER_KEYS}; got {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, Mapping) else "")
    )


def load_author_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, *, strict: bool = True) -> LoadReport:
    """Load a checkpoint of the author's LGD-3D module (or one saved by lgd_fast) into ``model``.

    Accepts a path or a dict, with or without a wrapping training dict and a ``module.`` prefix.
    Keys only lgd_fast has (the combination classifier, ``kernel_head.*``) keep their initialisation.
    A tensor of the wrong shape always raises a ValueError listing every problem; so does, with
    ``strict`` (default), any other missing or unexpected key. Without ``strict`` those are logged and
    returned in the report, and the matching tensors are loaded.
    """
    state = read_state_dict(source)
    model_sd = model.state_dict()
    report = LoadReport()
    for key in model_sd:
        if key in state:
            report.loaded.append(key)
        elif key.startswith(_OWN_PREFIXES):
            report.initialised[key] = "not in the author's module: kept as initialised"
        else:
            report.missing.append(key)
    report.unexpected = [k for k in state if k not in model_sd]
    report.mismatched = [
        f"{k}: model {tuple(model_sd[k].shape)} vs checkpoint {tuple(state[k].shape)}"
        for k in report.loaded
        if model_sd[k].shape != state[k].shape
    ]
    message = f"checkpoint does not match {type(model).__name__} (built for another variant?):\n{report}"
    if report.mismatched or (strict and (report.missing or report.unexpected)):
        raise ValueError(message + ("" if report.mismatched else "\n(pass strict=False to load the matching part)"))
    if report.missing or report.unexpected:
        log.warning(message)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def inflate_imagenet(model: nn.Module, source: str | os.PathLike | Mapping) -> LoadReport:
    """Initialise ``model`` from a torchvision-format 2-D ResNet state_dict on disk (SPEC.md section 3).

    LGD-3D: every 2-D kernel k x k becomes 1 x k x k; the stem's 7 x 7 kernel is placed at the centre
    tap (index k_t // 2) of its k_t x 7 x 7 kernel, zeros elsewhere; temporal 3x1x1 kernels start as the
    identity (centre tap 1) in A blocks and as zero in B and C blocks. LGD-2D loads the 2-D weights as
    they are. The classifier ``fc`` (ImageNet's 1000 classes) is skipped; the global path (fc1..fc6),
    ``fc_g`` and the combination classifier keep their initialisation. A source of another depth or
    width raises a ValueError naming the mismatching tensors.
    """
    if not isinstance(model, LGD3D | LGD2D):
        raise TypeError(f"inflate_imagenet takes an LGD3D or LGD2D model, got {type(model).__name__}")
    state = read_state_dict(source)
    model_sd = model.state_dict()
    report = LoadReport()
    new_sd: dict[str, torch.Tensor] = {}
    for key in ("fc.weight", "fc.bias"):
        if key in state:
            report.skipped[key] = "ImageNet classifier: replaced for the target label set"
    for key, target in model_sd.items():
        if key.startswith(("fc.", "fc_g.", "kernel_head.")) or key.split(".")[-2] in {f"fc{i}" for i in range(1, 7)}:
            report.initialised[key] = "not in a 2-D ResNet: kept as initialised"
        elif key in state:
            new_sd[key] = _inflate_tensor(key, state[key], target)
            report.loaded.append(key)
        elif "_t." in key and isinstance(model, LGD3D):
            new_sd[key] = _temporal_init(model, key, target)
            report.initialised[key] = "temporal kernel: identity in A blocks, zero in B and C blocks"
        elif key.endswith("num_batches_tracked"):
            report.initialised[key] = "BatchNorm counter"
        else:
            report.missing.append(key)
    report.unexpected = [k for k in state if k not in model_sd and k not in report.skipped]
    if report.missing or report.unexpected:
        raise ValueError(f"ImageNet state_dict does not match {type(model).__name__} (another depth?):\n{report}")
    model.load_state_dict(new_sd, strict=False)
    return report


def _inflate_tensor(key: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    source = source.to(target.dtype)
    if source.dim() == 4 and target.dim() == 5:  # 2-D conv kernel into a 3-D one
        out_c, in_c, kt, kh, kw = target.shape
        if tuple(source.shape) != (out_c, in_c, kh, kw):
            raise ValueError(f"{key}: cannot inflate a {tuple(source.shape)} kernel into {tuple(target.shape)}")
        inflated = torch.zeros_like(target)
        inflated[:, :, kt // 2] = source
        return inflated
    if source.shape != target.shape:
        raise ValueError(f"{key}: ImageNet tensor {tuple(source.shape)} does not fit the model's {tuple(target.shape)}")
    return source.clone()


def _temporal_init(model: nn.Module, key: str, target: torch.Tensor) -> torch.Tensor:
    block = model.get_submodule(key.rsplit(".", 2)[0])
    assert isinstance(block, P3DBottleneck | P3DBasicBlock), key
    kernel = torch.zeros_like(target)
    if block.variant == "A":
        out_c, in_c, kt = target.shape[:3]
        assert out_c == in_c, key  # A-block temporal convs map a width to itself
        kernel[torch.arange(out_c), torch.arange(out_c), kt // 2] = 1.0
    return kernel
