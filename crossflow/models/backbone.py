"""The backbone file: the pretrained AlexNet with batch norm folded away, and its loader.

Folding a parameter-free BN (running mean mu, variance var, eps) that follows a conv:
``BN(W x + b) = (W x + b - mu) / sqrt(var + eps) = W' x + b'`` with
``W' = W / sqrt(var + eps)`` (per output channel) and ``b' = (b - mu) / sqrt(var + eps)``.

:func:`load_backbone` reads two formats, told apart by their content: a crossflow backbone file
(:func:`save_backbone`; version 1 files, from before ``arch`` was recorded, are the crossflow
architecture) and torchvision's AlexNet ``state_dict`` (the ImageNet-supervised "Class Labels"
network, e.g. ``alexnet-owt-7be5be79.pth``), which becomes the ``torchvision`` architecture.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from crossflow.checkpoints import UnsafeFileError, load_error, save_atomic
from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.models.alexnet import CONV_LAYERS, AlexNet

BACKBONE_FORMAT = "crossflow-backbone"
BACKBONE_FORMAT_VERSION = 2  # 2: config records "arch"; version 1 files (no arch) are the crossflow architecture
# torchvision.models.alexnet's parameter names of our layers; its fc8 (classifier.6) is dropped.
TORCHVISION_LAYERS = {
    "conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8", "conv5": "features.10",
    "fc6": "classifier.1", "fc7": "classifier.4",
}
TORCHVISION_KEYS = frozenset(f"{prefix}.{p}" for prefix in TORCHVISION_LAYERS.values() for p in ("weight", "bias"))
TORCHVISION_FC8_KEYS = frozenset({"classifier.6.weight", "classifier.6.bias"})
FORMATS_HINT = (
    "expected a crossflow backbone file (make one with `crossflow export CHECKPOINT OUT`) or a torchvision AlexNet "
    "state_dict (keys features.0.weight ... classifier.6.bias, as torchvision's alexnet-owt-7be5be79.pth)"
)
# Input normalisation of every network here: RGB in [0, 1], then (x - mean) / std.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def fold_batch_norm(network: AlexNet) -> AlexNet:
    """A copy of ``network`` without BN layers that computes what its eval mode computes."""
    folded = AlexNet(batch_norm=False, groups=network.groups, arch=network.arch)
    for name in CONV_LAYERS:
        conv, target = network.conv(name), folded.conv(name)
        weight, bias = conv.weight.double(), conv.bias.double()
        if network.batch_norm:
            bn = network.layers[name].bn
            inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
            weight = weight * inv_std.view(-1, 1, 1, 1)
            bias = (bias - bn.running_mean.double()) * inv_std
        target.weight.copy_(weight.to(target.weight.dtype))
        target.bias.copy_(bias.to(target.bias.dtype))
    return folded.eval()


def untrained_layers(network: AlexNet) -> list[str]:
    """The conv/fc layers of a BN ``network`` whose batch norm never saw a training batch (``num_batches_tracked``
    0): layers its training never ran (fc6/fc7 when the deepest tap is pool5 or the crops are under 193 px). They
    hold their random initialisation, unscaled; the evals rescale them (:func:`evals.common.setup_backbone`)."""
    if not network.batch_norm:
        return []
    return [name for name in CONV_LAYERS if int(network.layers[name].bn.num_batches_tracked) == 0]


def save_backbone(network: AlexNet, path: str | os.PathLike, source: dict | None = None) -> Path:
    """Fold BN and write the backbone file atomically (:func:`crossflow.checkpoints.save_atomic`); returns its path.
    The record's ``untrained_layers`` lists :func:`untrained_layers` (none for a network without BN)."""
    path = Path(path)
    folded = fold_batch_norm(network)
    record = {
        "format": BACKBONE_FORMAT,
        "format_version": BACKBONE_FORMAT_VERSION,
        "arch": "alexnet",
        "config": {"groups": network.groups, "arch": network.arch},
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "source": source or {},
        "untrained_layers": untrained_layers(network),
        "state_dict": folded.state_dict(),
    }
    return save_atomic(record, path)


def load_backbone(path: str | os.PathLike | None) -> AlexNet:
    """The backbone in a file (no BN, eval mode); ``None`` gives the random initialisation.

    The file is a crossflow backbone file or a torchvision AlexNet ``state_dict``; anything else is an
    :class:`InvalidInputError` with a one-line message.
    """
    if path is None:
        return AlexNet(batch_norm=False).eval()
    kind, record = read_backbone_file(path)
    if kind == "torchvision":
        return alexnet_from_torchvision(record, path)
    network = AlexNet(batch_norm=False, **record["config"])
    network.load_state_dict(record["state_dict"])
    return network.eval()


def read_backbone_file(path: str | os.PathLike) -> tuple[str, dict]:
    """``(kind, content)`` of a backbone file: ``("crossflow", record)`` or ``("torchvision", state_dict)``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"backbone file not found: {path} (make one with `crossflow export CHECKPOINT OUT`)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files it cannot read
        if isinstance(refusal := load_error(path, error, "backbone file"), UnsafeFileError):
            raise refusal from None  # a file carrying code: say so, not "not a backbone file"
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]  # one line
        raise InvalidInputError(f"{path} is not a crossflow backbone file, nor a torchvision AlexNet state_dict: torch.load failed ({reason}); {FORMATS_HINT}") from None
    if isinstance(record, Mapping) and record.get("format") == BACKBONE_FORMAT:
        if record["format_version"] > BACKBONE_FORMAT_VERSION:
            raise InvalidInputError(f"{path} has backbone format {record['format_version']}; this crossflow reads up to {BACKBONE_FORMAT_VERSION}: upgrade crossflow")
        return "crossflow", record
    if isinstance(record, Mapping) and TORCHVISION_KEYS <= record.keys() <= TORCHVISION_KEYS | TORCHVISION_FC8_KEYS:
        return "torchvision", record
    raise InvalidInputError(f"{path} is not a crossflow backbone file, nor a torchvision AlexNet state_dict; {FORMATS_HINT}")


@torch.no_grad()
def alexnet_from_torchvision(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike = "state_dict") -> AlexNet:
    """torchvision's AlexNet parameters -> our ``torchvision`` architecture (no BN, eval mode).

    Convolutions are copied as they are; fc6's ``[4096, 9216]`` weight becomes a 6x6 convolution
    ``[4096, 256, 6, 6]`` (torchvision flattens pool5 as ``c * 36 + y * 6 + x``, the same order) and
    fc7's ``[4096, 4096]`` a 1x1 one; fc8 (``classifier.6``, the 1000 ImageNet classes) is dropped.
    """
    network = AlexNet(batch_norm=False, arch="torchvision")
    for layer, prefix in TORCHVISION_LAYERS.items():
        conv = network.conv(layer)
        linear = layer.startswith("fc")  # torchvision's nn.Linear: weight [out, in * k * k]
        for name, target in (("weight", conv.weight), ("bias", conv.bias)):
            tensor = state_dict[f"{prefix}.{name}"]
            expected = (target.shape[0], target[0].numel()) if linear and name == "weight" else tuple(target.shape)
            if tuple(tensor.shape) != expected:
                raise InvalidInputError(
                    f"{source}: {prefix}.{name} has shape {tuple(tensor.shape)} where torchvision's AlexNet has {expected} "
                    f"({layer}); {FORMATS_HINT}"
                )
            target.copy_(tensor.reshape(target.shape))
    return network.eval()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
