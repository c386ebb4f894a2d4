"""Networks: the padded AlexNet, sparse hypercolumn heads, and the exported backbone file."""

from crossflow.models.alexnet import LAYERS, AlexNet, layer_channels, layer_geometry
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD, fold_batch_norm, load_backbone, save_backbone
from crossflow.models.hypercolumn import HypercolumnMLP, dense_head_output, sample_at_points, sparse_hypercolumn

__all__ = [
    "LAYERS", "AlexNet", "layer_channels", "layer_geometry", "IMAGE_MEAN", "IMAGE_STD", "fold_batch_norm",
    "load_backbone", "save_backbone", "HypercolumnMLP", "dense_head_output", "sample_at_points", "sparse_hypercolumn",
]
