"""Per-layer activation statistics of backbones on eval images (issue 12, point 4).

For each backbone (crossflow export files given as arguments, ``random`` and ``random-rescaled``, each built
as the evals build it: ``evals.common.backbone_from_spec`` after ``seed_everything(0)``, and for
``random-rescaled`` and a file's ``untrained_layers`` ``evals.common.rescale_untrained_layers`` on ``RESCALE_IMAGES``
training images of the VOC07 classification eval, as ``evals.common.setup_backbone`` does) and each of conv1..conv5, fc6, fc7:

- the pre-activation ``z`` (the conv's output, before the ReLU): mean over channels of the per-channel mean,
  mean over channels of the per-channel std, and the std over channels of the per-channel std;
- the activation ``a = relu(z)`` (the tap): mean |a|, the share of zeros, the share of dead channels
  (zero at every position of every image), and its effective dimension: the participation ratio
  ``(sum_i l_i)^2 / sum_i l_i^2`` of the eigenvalues ``l_i`` of the channels' correlation matrix over every image
  and position (C when the channels are uncorrelated, 1 when one direction carries everything; correlation, not
  covariance, so that channels of unequal scale do not count as fewer dimensions), as a share of the channels C.

Images: ``--images`` inputs drawn from the VOC2007 ``test`` split of a ``crossflow synth voc`` folder, through
the classification eval's own transform (random scale crop to 224 px, flips; the demo config's scales),
seeded. The point: does a BN-folded exported backbone have sane activation scales next to the random ones,
and are layers dead?

    .venv/bin/crossflow synth voc --out DIR --num-images 40 --seed 1
    .venv/bin/python benchmarks/backbone_statistics.py --voc DIR [BACKBONE.pt ...]   # ~1 min; results/backbone_statistics.md
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import lightning as L
import torch

from crossflow.files import write_text_atomic
from crossflow.models.alexnet import CONV_LAYERS
from crossflow.models.backbone import read_backbone_file
from evals.common import RESCALE_IMAGES, RESCALE_SEED, RESCALED_BACKBONE, backbone_from_spec, rescale_untrained_layers, training_images
from evals.voc07_cls import VOC07ClassificationData

ROOT = Path(__file__).resolve().parents[1]
STATISTICS_SEED = 1  # the images measured: another draw than the rescaling's (seed 0)


def build(spec: str, train_set) -> torch.nn.Module:
    """The backbone an eval fits from ``spec`` (seed 0, as the demo evals' ``seed_everything``)."""
    L.seed_everything(0, verbose=False)
    network = backbone_from_spec(spec)
    rescale_untrained_layers(network, spec, training_images(train_set, RESCALE_IMAGES, RESCALE_SEED))
    return network.eval()


@torch.no_grad()
def layer_statistics(network, images: torch.Tensor, batch: int = 16) -> dict[str, dict[str, float]]:
    """{layer: statistics} over ``images [N, 3, 224, 224]`` (see the module docstring)."""
    pre: dict[str, list[torch.Tensor]] = {name: [] for name in CONV_LAYERS}
    hooks = [network.conv(name).register_forward_hook(lambda m, i, out, name=name: pre[name].append(out.detach().clone()))
             for name in CONV_LAYERS]
    try:
        for start in range(0, len(images), batch):
            network(images[start : start + batch], ["fc7"])
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for name in CONV_LAYERS:
        z = torch.cat(pre[name]).transpose(0, 1).flatten(1).double()  # [C, N h w]
        a = z.clamp(min=0)
        channel_std = z.std(dim=1, unbiased=False)
        result[name] = {
            "z_mean": float(z.mean(dim=1).mean()), "z_std": float(channel_std.mean()), "z_std_spread": float(channel_std.std()),
            "a_mean": float(a.mean()), "zeros": float((a == 0).double().mean()), "dead": float((a.amax(dim=1) == 0).double().mean()),
            "effective": participation_ratio(a) / len(a),
        }
    return result


def participation_ratio(a: torch.Tensor) -> float:
    """``(sum l)^2 / sum l^2`` of the eigenvalues of the correlation matrix of ``a [C, M]`` (C channels, M samples;
    constant channels left out), computed as ``trace(S)^2 / ||S||_F^2`` of ``S = A A^T`` for the standardised ``A``
    (or of the M x M Gram matrix when M < C: the same non-zero eigenvalues)."""
    centred = a - a.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    standard = centred[norms > 0] / norms[norms > 0, None]
    gram = standard @ standard.T if len(standard) <= standard.shape[1] else standard.T @ standard
    return float(gram.diagonal().sum() ** 2 / gram.square().sum()) if len(standard) else 0.0


def describe(spec: str) -> str:
    if spec in ("random", RESCALED_BACKBONE):
        return spec
    kind, record = read_backbone_file(spec)
    source = record.get("source", {}) if kind == "crossflow" else {}
    details = [source.get("objective", kind)]
    details += [f"taps {', '.join(source['taps'])}"] if source.get("taps") else []
    details += [f"untrained {', '.join(record['untrained_layers'])}"] if record.get("untrained_layers") else []
    return f"{Path(spec).name} ({'; '.join(details)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbones", nargs="*", help="crossflow backbone files (crossflow export)")
    parser.add_argument("--voc", required=True, help="a `crossflow synth voc` folder (VOCdevkit/VOC2007)")
    parser.add_argument("--images", type=int, default=64, help="224 px inputs measured")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backbone_statistics.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = VOC07ClassificationData(root=args.voc, crop_size=224, min_scale=0.5, max_scale=2.0, num_workers=0, test_split="test")
    data.setup("fit")
    test = VOC07ClassificationData(root=args.voc, crop_size=224, min_scale=0.5, max_scale=2.0, num_workers=0, train_split="test")
    test.setup("fit")  # the test split's images through the eval's training transform
    images = torch.stack(training_images(test.train_set, args.images, STATISTICS_SEED))
    columns = ["backbone", "layer", "z mean", "z per-channel std: mean", "std over channels", "mean ‖a‖", "% zeros", "% dead channels",
               "effective dimension of a, % of C"]
    lines = ["# backbone activation statistics", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for spec in [*args.backbones, "random", RESCALED_BACKBONE]:
        statistics = layer_statistics(build(spec, data.train_set), images)
        for name, s in statistics.items():
            lines.append(f"| {describe(spec)} | {name} | {s['z_mean']:.3g} | {s['z_std']:.3g} | {s['z_std_spread']:.3g} | "
                         f"{s['a_mean']:.3g} | {100 * s['zeros']:.1f} | {100 * s['dead']:.1f} | {100 * s['effective']:.1f} |")
    lines += [
        "",
        f"- Images: {args.images} inputs of 224 px from the VOC2007 test split of {args.voc} ({len(test.train_set)} images), through "
        "the classification eval's transform (random scale crop, scales 0.5-2, flips), normalised; seed "
        f"{STATISTICS_SEED}. random-rescaled: rescaled on {RESCALE_IMAGES} trainval inputs (seed {RESCALE_SEED}), as evals/common.py does.",
        "- z: a layer's pre-activation (conv output); statistics per channel over every image and position, then "
        "over channels; a = relu(z), the tap; a dead channel is zero at every position of every image; effective dimension: "
        "the participation ratio of a's channel correlation matrix over every image and position, as a share of the channels "
        "(fc6 and fc7 have one position per image, so theirs is bounded by the image count).",
        f"- Machine: {platform.machine()}, torch {torch.__version__}; 2-core x86-64 CPU, 24 GB, no GPU; shared with other jobs.",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
