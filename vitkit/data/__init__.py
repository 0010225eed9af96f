"""Datasets (classification, segmentation, depth, detection, image-text), the task rule, built-in shapes data, transforms, batch augmentation, mixup/cutmix, samplers, loaders."""

from __future__ import annotations

from .arrays import read_idx
from .augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, Normalize, random_erase
from .boxes_tf import BoxEvalTransform, BoxTrainTransform
from .captions import (
    CaptionDataset,
    CaptionInfo,
    CaptionShards,
    CaptionTransform,
    SceneCaptions,
    ShapesCaptions,
    build_caption_dataset,
    captions_summary,
    collate_captions,
    describe_captions,
)
from .dataset import ImageDataset
from .dense import DenseDataset, build_dense_dataset
from .detection import DetectionDataset, DetectionInfo, build_detection_dataset, describe_detection
from .formats import SUPPORTED, build_dataset
from .images import MAX_IMAGE_PIXELS, BadImageError, decode_image, to_channels
from .inspect import DatasetInfo, describe_datasets, describe_dense, inspect_dataset
from .joint import JointEvalTransform, JointTrainTransform
from .loader import ImageLoader, build_loader, collate, sample_rng
from .mix import Mixup, cutmix_box, smooth_one_hot
from .paths import is_system_path
from .rand_augment import RandAugment, parse_rand_augment
from .samplers import RepeatAugSampler, ResumableSampler
from .scan import ScanReport, scan_files
from .shapes import (
    CAPTION_TEMPLATES,
    DEFAULT_CLASSES,
    EXTRA_CLASSES,
    ShapesDataset,
    render_shape,
    shape_captions,
)
from .skips import SkipCounter
from .splits import stratified_split
from .stage import DataStage, prepare_data
from .task import TASKS, TaskChoice, detect_task
from .transforms import EvalTransform, TrainTransform, pil_to_uint8
from .webdataset import WebDatasetShards, expand_shards

__all__ = [
    "CAPTION_TEMPLATES",
    "CaptionDataset",
    "CaptionInfo",
    "CaptionShards",
    "CaptionTransform",
    "captions_summary",
    "SceneCaptions",
    "ShapesCaptions",
    "build_caption_dataset",
    "collate_captions",
    "describe_captions",
    "shape_captions",
    "BoxTrainTransform",
    "BoxEvalTransform",
    "DetectionDataset",
    "DetectionInfo",
    "build_detection_dataset",
    "describe_detection",
    "detect_task",
    "describe_dense",
    "build_dense_dataset",
    "TaskChoice",
    "TASKS",
    "JointTrainTransform",
    "JointEvalTransform",
    "DenseDataset",
    "BadImageError",
    "BatchAugment",
    "DEFAULT_CLASSES",
    "DataStage",
    "DatasetInfo",
    "EXTRA_CLASSES",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "ImageLoader",
    "MAX_IMAGE_PIXELS",
    "Mixup",
    "Normalize",
    "RandAugment",
    "RepeatAugSampler",
    "ResumableSampler",
    "SUPPORTED",
    "ScanReport",
    "ShapesDataset",
    "SkipCounter",
    "TrainTransform",
    "WebDatasetShards",
    "build_dataset",
    "build_loader",
    "collate",
    "cutmix_box",
    "decode_image",
    "expand_shards",
    "describe_datasets",
    "inspect_dataset",
    "is_system_path",
    "parse_rand_augment",
    "pil_to_uint8",
    "prepare_data",
    "random_erase",
    "read_idx",
    "render_shape",
    "sample_rng",
    "scan_files",
    "smooth_one_hot",
    "stratified_split",
    "to_channels",
]
