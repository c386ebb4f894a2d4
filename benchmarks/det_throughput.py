"""VOC07 detection costs: selective search time per image, Fast R-CNN training and test images/s.

Proposals: OpenCV selective search ("fast", one process, one thread) on the real VOC2007 images in
../shared/data (~500 x 375) and on synthetic demo images (160-256 px). Training: full steps
(2 images x ``rois_per_image`` RoIs: forward, loss, backward, SGD) cycling through the config's
training scales; test: one image at the test scale with ``max_proposals`` RoIs, forward and
detection (softmax, decoding, NMS). Random backbone, random pixels (the cost does not depend on
either); wall and CPU seconds are both reported (CPU time is robust to a busy machine).
Writes ``benchmarks/results/det_throughput.md``.

    .venv/bin/python benchmarks/det_throughput.py [--steps 3] [--settings demo paper]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from crossflow.cli import main as crossflow_main
from evals.fast_rcnn import detect
from evals.proposals import selective_search
from evals.voc import read_rgb
from evals.voc07_det import VOC07Detection, batch_rois, image_scale

ROOT = Path(__file__).resolve().parents[1]
REAL_VOC = ROOT.parent / "shared" / "data" / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages"
# (training scales, longer side cap, RoIs per image, test scale, test cap, proposals per test image), from the configs
SETTINGS = {
    "paper": ((480, 576, 688, 864, 1200), 2000, 128, 600, 1000, 2000),
    "demo": ((192, 224, 256, 288, 320), 533, 64, 256, 427, 500),
}
IMAGE_SIZE = {"paper": (375, 500), "demo": (208, 208)}  # a typical VOC image / synthetic image (H, W)


def timed(function) -> tuple[float, float]:
    """(wall s, CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def proposal_times(images: list[Path]) -> tuple[float, float, float]:
    """(wall s per image, CPU s per image, mean boxes) of selective search fast."""
    rgb = [read_rgb(p) for p in images]
    selective_search(rgb[0])  # warm-up
    counts, wall, cpu = [], 0.0, 0.0
    for image in rgb:
        w, c = timed(lambda: counts.append(len(selective_search(image))))
        wall, cpu = wall + w, cpu + c
    return wall / len(rgb), cpu / len(rgb), float(np.mean(counts))


def random_proposals(count: int, height: int, width: int) -> torch.Tensor:
    xy = torch.rand(count, 2) * torch.tensor([width * 0.7, height * 0.7])
    size = 16 + torch.rand(count, 2) * torch.tensor([width * 0.3, height * 0.3])
    return torch.cat([xy, xy + size], 1)


def training_batch(height: int, width: int, scale: float) -> dict:
    h, w = round(height * scale), round(width * scale)
    items = []
    for _ in range(2):
        gt = random_proposals(3, h, w)
        items.append({
            "proposals": torch.cat([gt + torch.randn(3, 4) * 4 for _ in range(100)] + [random_proposals(1700, h, w)]),
            "boxes": gt, "labels": torch.randint(0, 20, (3,)), "difficult": torch.zeros(3, dtype=torch.bool),
        })
    return {"images": torch.randn(2, 3, h, w), "items": items}


def training_rate(name: str, steps: int) -> tuple[float, float]:
    """(images per wall s, images per CPU s) of training steps cycling through the scales."""
    scales, max_size, rois, *_ = SETTINGS[name]
    model = VOC07Detection(rois_per_image=rois).train()
    optimizer = model.configure_optimizers()["optimizer"]
    height, width = IMAGE_SIZE[name]

    def step(target: int) -> None:
        loss = model.training_step(training_batch(height, width, image_scale(height, width, target, max_size)), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(scales[0])  # warm-up
    wall = cpu = 0.0
    for i in range(steps * len(scales)):
        w, c = timed(lambda: step(scales[i % len(scales)]))
        wall, cpu = wall + w, cpu + c
    images = 2 * steps * len(scales)
    return images / wall, images / cpu


@torch.no_grad()
def test_rate(name: str, steps: int) -> tuple[float, float]:
    """(images per wall s, images per CPU s) at the test scale with the config's proposals per image."""
    *_, scale_target, max_size, proposals = SETTINGS[name]
    model = VOC07Detection().eval()
    height, width = IMAGE_SIZE[name]
    scale = image_scale(height, width, scale_target, max_size)
    h, w = round(height * scale), round(width * scale)
    image, boxes = torch.randn(1, 3, h, w), random_proposals(proposals, h, w)
    rois = batch_rois([boxes])

    def step() -> None:
        logits, deltas = model.network(image, rois)
        detect(logits, deltas, boxes / scale, height, width)

    step()
    wall = cpu = 0.0
    for _ in range(steps):
        w, c = timed(step)
        wall, cpu = wall + w, cpu + c
    return steps / wall, steps / cpu


def synthetic_images(folder: Path, count: int) -> list[Path]:
    assert crossflow_main(["synth", "voc", "--out", str(folder), "--num-images", str(count), "--workers", "1"]) == 0
    return sorted((folder / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per scale, and 5x as many test images")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "det_throughput.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*self.trainer.* reference is not registered")  # training_step's self.log outside a Trainer
    lines = [
        "# VOC07 detection throughput", "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU only; "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/det_throughput.py --steps {args.steps}`.", "",
        "## Selective search (fast), one process", "",
        "| images | s / image (wall) | CPU s / image | boxes / image |", "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"real VOC2007 (~500x375)": sorted(REAL_VOC.glob("*.jpg")), "synthetic demo (160-256 px)": synthetic_images(Path(tmp) / "voc", 10)[:10]}
        for label, images in sources.items():
            if images:
                wall, cpu, boxes = proposal_times(images)
                lines.append(f"| {label}, {len(images)} | {wall:.3f} | {cpu:.3f} | {boxes:.0f} |")
                print(lines[-1], flush=True)
    lines += [
        "", "## Fast R-CNN (random backbone)", "",
        "| setting | image (H x W) | train scales / RoIs per image | train img/s (wall) | train img / CPU s | test scale / proposals | test img/s (wall) | test img / CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.settings:
        scales, max_size, rois, test_scale, test_max, proposals = SETTINGS[name]
        train_wall, train_cpu = training_rate(name, args.steps)
        test_wall, test_cpu = test_rate(name, 5 * args.steps)
        lines.append(
            f"| {name} | {IMAGE_SIZE[name][0]} x {IMAGE_SIZE[name][1]} | {list(scales)} (<= {max_size}) / {rois} | {train_wall:.3f} | {train_cpu:.3f} "
            f"| {test_scale} (<= {test_max}) / {proposals} | {test_wall:.3f} | {test_cpu:.3f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs shared the CPU: CPU s per wall s shows the cores this process got)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
