"""Pretraining throughput (images/s) for the demo and paper configs, and where a step's time goes.

Times full training steps (forward, loss, backward, Adam) of the pretraining module on
random batches of the config's shape, after warm-up, together with the backbone alone
(forward + backward up to the taps) and the forward + backward with the head and loss
(sampling, MLP, loss); gives each over the backbone's time, and the same ratio in matmul and
convolution FLOPs (the floor if the head ran as fast per FLOP as the backbone). Writes ``benchmarks/results/pretrain_throughput.md``.

    python benchmarks/pretrain_throughput.py [--steps 5] [--configs demo paper] [--device cpu|cuda] [--precision 32|bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from crossflow.module import CrossFlowPretraining

CONFIGS = {
    # name: (crop, batch, points, taps, hidden width) as in configs/pretrain/{demo,cpof_alexnet}.yaml
    "demo": (128, 32, 256, ["conv1", "pool1", "conv3", "pool5"], 512),
    "paper": (224, 96, 512, ["conv1", "pool1", "conv3", "pool5", "fc7"], 1024),
    "tiny": (64, 4, 32, ["conv1", "pool1", "conv3", "pool5"], 64),  # benchmarks/gpu_check.sh --dry-run's sizes
}


def random_batch(crop: int, batch: int, points: int, device: str) -> dict:
    return {
        "image": torch.randn(batch, 3, crop, crop, device=device),
        "points": torch.rand(batch, points, 2, device=device) * (crop - 1),
        "flow": torch.rand(batch, points, 2, device=device) * 2 - 1,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    """bf16 autocast as Lightning's ``bf16-mixed`` (weights stay float32), or a no-op for ``32``."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")


def backbone_forward_backward(module: CrossFlowPretraining, batch: dict, device: str, precision: str) -> None:
    """The backbone's forward to its taps and a backward from them alone."""
    with autocast(device, precision):
        activations = module.backbone_taps(batch["image"])
    torch.autograd.backward(list(activations.values()), [torch.ones_like(a) for a in activations.values()])


def full_forward_backward(module: CrossFlowPretraining, batch: dict, device: str, precision: str) -> None:
    """Backbone, head and loss forward, then backward."""
    with autocast(device, precision):
        loss = module.objective_loss(module(batch["image"], batch["points"]), batch["flow"])
    loss.backward()


def time_in_turn(module: CrossFlowPretraining, batch: dict, steps: int, device: str, precision: str) -> dict[str, float]:
    """Median seconds of the backbone's forward + backward to its taps alone (``backbone``), of the whole forward + loss +
    backward (``full``) and of the training step with Adam (``step``), at the steps' precision. The three run in turn
    within each repetition, so a drift in the machine's speed touches all three alike."""
    optimizer = module.configure_optimizers()

    def step():
        optimizer.zero_grad(set_to_none=True)
        full_forward_backward(module, batch, device, precision)
        optimizer.step()

    parts = {
        "backbone": lambda: backbone_forward_backward(module, batch, device, precision),
        "full": lambda: full_forward_backward(module, batch, device, precision),
        "step": step,
    }
    timings = {name: [] for name in parts}
    for repetition in range(steps + 1):  # the first is the warm-up
        for name, fn in parts.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if repetition:
                timings[name].append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    return {name: statistics.median(seconds) for name, seconds in timings.items()}


def flop_ratio(module: CrossFlowPretraining, batch: dict, device: str, precision: str) -> float:
    """Matmul and convolution FLOPs (``torch.utils.flop_counter``) of the whole forward + loss + backward over the
    backbone's alone: the ratio the step would have if the head ran at the backbone's FLOP rate."""
    with FlopCounterMode(display=False) as backbone:
        backbone_forward_backward(module, batch, device, precision)
    with FlopCounterMode(display=False) as full:
        full_forward_backward(module, batch, device, precision)
    module.zero_grad(set_to_none=True)
    return full.get_total_flops() / backbone.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=["demo", "paper"], choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretrain_throughput.md"))
    args = parser.parse_args()

    # glibc maps blocks over 32 MB afresh and unmaps them on free unless told not to (the Makefile's CPU_MALLOC): the
    # head's 200 MB tensors then page-fault back in every step, which costs the paper config a fifth of its rate
    allocator = "heap kept" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "glibc default (`make benchmark` keeps the heap)"
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, allocator {allocator}")
    rows = []
    for name in args.configs:
        crop, batch_size, points, taps, hidden = CONFIGS[name]
        torch.manual_seed(0)
        module = CrossFlowPretraining(taps=taps, hidden_dim=hidden).to(args.device).train()
        batch = random_batch(crop, batch_size, points, args.device)
        timings = time_in_turn(module, batch, args.steps, args.device, args.precision)
        seconds, share = timings["step"], timings["backbone"] / timings["full"]
        rows.append(
            f"| {name} | {crop} | {batch_size} | {points} | {seconds:.4g} | {batch_size / seconds:.1f} | {100 * share:.0f}% | {100 * (1 - share):.0f}% "
            f"| {1 / share:.2f}x | {seconds / timings['backbone']:.2f}x | {flop_ratio(module, batch, args.device, args.precision):.2f}x |"
        )
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Machine: {machine}; torch {torch.__version__}; precision {args.precision}; medians of {args.steps} repetitions after "
        "a warm-up, each timing the backbone, the forward + backward and the step in turn.",
        "",
        "| config | crop | batch | points/image | s/step | images/s | backbone | head + loss | forward + backward / backbone's "
        "| step (with Adam) / backbone's | FLOPs / backbone's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
