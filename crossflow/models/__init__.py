"""Networks: AlexNet (two architectures), sparse hypercolumn heads, the backbone file, data-dependent rescaling."""

from crossflow.models.alexnet import ARCHS, LAYERS, AlexNet, layer_channels, layer_geometry
from crossflow.models.backbone import (
    IMAGE_MEAN, IMAGE_STD, alexnet_from_torchvision, fold_batch_norm, load_backbone, save_backbone,
)
from crossflow.models.hypercolumn import HypercolumnMLP, sample_at_points, sparse_hypercolumn
from crossflow.models.rescale import data_dependent_rescale

__all__ = [
    "ARCHS", "LAYERS", "AlexNet", "layer_channels", "layer_geometry", "IMAGE_MEAN", "IMAGE_STD", "alexnet_from_torchvision",
    "fold_batch_norm", "load_backbone", "save_backbone", "HypercolumnMLP", "sample_at_points",
    "sparse_hypercolumn", "data_dependent_rescale",
]
