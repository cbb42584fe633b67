"""The video data pipeline: annotations, samplers, decoding (DALI, PyAV), loaders, the built-in dataset."""

from .annotations import AnnotationError, VideoRecord, read_annotations, read_class_index, shard, write_class_index
from .decode import VideoError, VideoInfo, probe, read_clip
from .loader import ClipBatch, ClipSpec, VideoClipLoader

__all__ = [
    "AnnotationError",
    "ClipBatch",
    "ClipSpec",
    "VideoClipLoader",
    "VideoError",
    "VideoInfo",
    "VideoRecord",
    "probe",
    "read_annotations",
    "read_class_index",
    "read_clip",
    "shard",
    "write_class_index",
]
