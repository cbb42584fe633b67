"""Training, evaluation and the demo: configs, the two-stage LGD loop, checkpoints, video-level testing."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config, save_config
from .predict import Prediction, load_trained, predict
from .train import Trainer, TrainingDiverged, build_model, clip_spec, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "Prediction",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "clip_spec",
    "load_checkpoint",
    "load_config",
    "load_trained",
    "predict",
    "save_checkpoint",
    "save_config",
    "train",
]
