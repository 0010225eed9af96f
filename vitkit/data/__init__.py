"""Datasets, built-in shapes data, transforms, batch augmentation, mixup/cutmix, samplers, loaders."""

from __future__ import annotations

from .augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, Normalize, random_erase
from .dataset import ImageDataset
from .formats import SUPPORTED, build_dataset, read_idx, stratified_split
from .images import MAX_IMAGE_PIXELS, BadImageError, decode_image, to_channels
from .inspect import DatasetInfo, inspect_dataset
from .loader import ImageLoader, build_loader, collate, sample_rng
from .mix import Mixup, cutmix_box, smooth_one_hot
from .rand_augment import RandAugment, parse_rand_augment
from .samplers import RepeatAugSampler, ResumableSampler
from .scan import ScanReport, is_system_path, scan_files, scan_path
from .shapes import DEFAULT_CLASSES, EXTRA_CLASSES, ShapesDataset, render_shape
from .skips import SkipCounter
from .transforms import EvalTransform, TrainTransform, pil_to_uint8
from .webdataset import WebDatasetShards, expand_shards

__all__ = [
    "BadImageError",
    "BatchAugment",
    "DEFAULT_CLASSES",
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
    "inspect_dataset",
    "is_system_path",
    "parse_rand_augment",
    "pil_to_uint8",
    "random_erase",
    "read_idx",
    "render_shape",
    "sample_rng",
    "scan_files",
    "scan_path",
    "smooth_one_hot",
    "stratified_split",
    "to_channels",
]
