"""The backbone file: the pretrained AlexNet with batch norm folded away, and its loader.

Folding a parameter-free BN (running mean mu, variance var, eps) that follows a conv:
``BN(W x + b) = (W x + b - mu) / sqrt(var + eps) = W' x + b'`` with
``W' = W / sqrt(var + eps)`` (per output channel) and ``b' = (b - mu) / sqrt(var + eps)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.models.alexnet import CONV_LAYERS, AlexNet

BACKBONE_FORMAT = "crossflow-backbone"
BACKBONE_FORMAT_VERSION = 1
# Input normalisation of every network here: RGB in [0, 1], then (x - mean) / std.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def fold_batch_norm(network: AlexNet) -> AlexNet:
    """A copy of ``network`` without BN layers that computes what its eval mode computes."""
    folded = AlexNet(batch_norm=False, groups=network.groups)
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


def save_backbone(network: AlexNet, path: str | os.PathLike, source: dict | None = None) -> Path:
    """Fold BN and write the backbone file atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = fold_batch_norm(network)
    record = {
        "format": BACKBONE_FORMAT,
        "format_version": BACKBONE_FORMAT_VERSION,
        "arch": "alexnet",
        "config": {"groups": network.groups},
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "source": source or {},
        "state_dict": folded.state_dict(),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(record, partial)
    os.replace(partial, path)
    return path


def load_backbone(path: str | os.PathLike | None) -> AlexNet:
    """The exported AlexNet (no BN, eval mode); ``None`` gives the random initialisation."""
    if path is None:
        return AlexNet(batch_norm=False).eval()
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"backbone file not found: {path} (make one with `crossflow export CHECKPOINT OUT`)")
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or record.get("format") != BACKBONE_FORMAT:
        raise InvalidInputError(f"{path} is not a crossflow backbone file (make one with `crossflow export CHECKPOINT OUT`)")
    if record["format_version"] > BACKBONE_FORMAT_VERSION:
        raise InvalidInputError(f"{path} has backbone format {record['format_version']}; this crossflow reads up to {BACKBONE_FORMAT_VERSION}: upgrade crossflow")
    network = AlexNet(batch_norm=False, **record["config"])
    network.load_state_dict(record["state_dict"])
    return network.eval()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
