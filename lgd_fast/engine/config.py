"""Typed training configuration: dataclasses, a YAML file, flags on top, the resolved config saved with the run.

Precedence: the dataclass defaults (the paper's and the author's recipe where they give one, SPEC.md), then
a YAML file (``--config FILE.yaml``, nested like the dataclasses), then ``--set section.key=value`` flags and
the named flags of ``lgd-fast train``. An unknown key or a value of the wrong type is a ``ConfigError``
naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config", "save_config"]


class ConfigError(ValueError):
    """A configuration key that does not exist, or a value that does not fit it."""


@dataclass
class DataConfig:
    """Where the videos are and how clips are made (SPEC.md section 5; LGD-3D: 16 x 112 x 112 from 128 px)."""

    root: str = ""  # dataset folder holding the lists below (lgd-fast make-dataset writes one)
    train_list: str = "train.txt"  # relative to root: `path label` list, Kinetics CSV or class folder
    val_list: str = "val.txt"
    class_index: str = "classes.txt"
    backend: str = "auto"  # auto | dali | pyav
    strict: bool = False  # with auto: error instead of falling back to PyAV
    clip_len: int = 16
    step: int = 1
    num_segments: int = 3  # LGD-2D
    resize_shorter: int = 128
    crop: int = 112
    flip: bool = True
    test_clips: int = 15  # LGD-3D views at test
    test_views: int = 10  # LGD-2D views at test
    test_crops: int = 1
    workers: int = 2


@dataclass
class ModelConfig:
    name: str = "lgd3d_r50"
    classifier: str = "kernel"  # kernel (two stages) | two_heads (stage 1 only)
    sketch_dim: int = 4096
    dropout: float = 0.5
    fast: bool = False  # the fused model (create_model(fast=True))
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels_last_3d activations and weights
    init_from: str = ""  # a checkpoint to fine-tune from (heads replaced when the label set differs)
    norm_eval: bool = False  # BatchNorm layers use (and keep) their running statistics in training (mmaction2's
    # norm_eval): for fine-tuning with small per-process batches; with it, K processes equal one exactly


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum, cosine schedule with linear warm-up, gradient clipping (author's recipe)."""

    lr: float = 0.04
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float = 40.0  # max global gradient norm; 0 disables
    batch_size: int = 16
    stage2_lr_scale: float = 1.0  # stage 2 restarts at lr * this and decays with its own cosine


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = ""  # run folder: config.yaml, checkpoints/, metrics.json, curves.png
    epochs: int = 10  # stage 1 epochs
    stage2_epochs: int = 2  # with classifier=kernel; ignored for two_heads
    amp: str = "none"  # none | bf16 | fp16 (autocast on CPU and GPU; fp16 adds a GradScaler)
    dtype: str = "float32"  # float32 | float64: parameters and clips (float64: slow; for exact checks, amp none)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms for bitwise resumes
    eval_every: int = 1  # epochs between validations (and best-checkpoint updates)
    max_steps_per_epoch: int = 0  # 0: whole epochs; else stop each epoch after this many steps (smoke runs)
    checkpoint_every_steps: int = 0  # also write last.pt every this many steps within an epoch (0: epoch ends)
    tensorboard: str = "auto"  # auto (where the tensorboard package imports) | true | false: RUN/tensorboard
    progress: bool = True

    def validate(self) -> TrainConfig:
        checks = [
            (self.data.backend in ("auto", "dali", "pyav"), "data.backend must be auto, dali or pyav"),
            (self.model.classifier in ("kernel", "two_heads"), "model.classifier must be kernel or two_heads"),
            (self.amp in ("none", "bf16", "fp16"), "amp must be none, bf16 or fp16"),
            (self.dtype in ("float32", "float64"), "dtype must be float32 or float64"),
            (self.dtype == "float32" or self.amp == "none", "dtype=float64 trains without autocast: set amp=none"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.stage2_epochs >= 0, "stage2_epochs must be >= 0"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
            (self.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0"),
            (0 <= self.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
            (self.optim.momentum > 0 or not self.optim.nesterov, "optim.nesterov needs optim.momentum > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.stage2_lr_scale > 0, "optim.stage2_lr_scale must be > 0"),
            (0 <= self.model.dropout < 1, "model.dropout must be in [0, 1)"),
            (self.model.sketch_dim >= 1, "model.sketch_dim must be >= 1"),
            (self.max_steps_per_epoch >= 0, "max_steps_per_epoch must be >= 0 (0: whole epochs)"),
            (self.data.workers >= 0, "data.workers must be >= 0"),
            (min(self.data.clip_len, self.data.step, self.data.num_segments, self.data.crop, self.data.test_clips,
                 self.data.test_views, self.data.test_crops) >= 1,
             "data.clip_len, step, num_segments, crop, test_clips, test_views and test_crops must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0 (0: only at epoch ends)"),
            (self.tensorboard in ("auto", "true", "false"), "tensorboard must be auto, true or false"),
            (self.data.crop <= self.data.resize_shorter, "data.crop must be <= data.resize_shorter"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_SWITCHES = {"tensorboard"}  # string keys whose values include the words true and false (auto | true | false)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str); strings from the command line are parsed."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, bool) and key in _SWITCHES:  # YAML reads true / false as booleans
            return "true" if value else "false"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} (from {source}) must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(obj, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {full!r} (from {source}); {prefix or 'top level'} keys: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} (from {source}) must be a mapping of its keys, got {value!r}")
            _apply(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, **flags) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (``"optim.lr=0.1"``), then ``flags``.

    ``flags`` take dotted names with ``__`` for the dot (``optim__lr=0.1``) or top-level names; None values
    are ignored (a flag that was not given).
    """
    config = TrainConfig()
    if path:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {os.fspath(path)!r} must hold a mapping, got {type(loaded).__name__}")
        _apply(config, loaded, "", os.fspath(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        _apply(config, _nest(key.strip(), yaml.safe_load(value) if value.strip() else ""), "", f"--set {item}")
    for key, value in flags.items():
        if value is not None:
            _apply(config, _nest(key.replace("__", "."), value), "", f"--{key.split('__')[-1].replace('_', '-')}")
    return config.validate()


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (readable back with ``load_config(path)``)."""
    from .checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_dict(config), sort_keys=False))  # (a kill keeps the old one)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A config from ``config_dict`` output (as stored in checkpoints)."""
    config = TrainConfig()
    _apply(config, values, "", "checkpoint")
    return config.validate()
