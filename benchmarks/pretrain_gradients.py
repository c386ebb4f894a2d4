"""Which layers learn in a short demo pretraining (issue 12, point 4): gradient and weight norms per layer.

Trains the model and data module of configs/pretrain/demo.yaml (the real CrossFlowPretraining and
PairDataModule, Lightning's Trainer, CPU) for ``--steps`` steps on a prepared demo folder, for the
objectives and learning rates of ``RUNS``: cross_pixel at 1e-3 (the demo's), flow_classification
(the direct baseline) at 1e-3 and at 1e-2 (the paper's 10x higher lr for the direct baseline: 1e-2 vs 1e-4).
A callback records, per layer (conv1..conv5: conv weight and bias; head: both linear layers):

- ``||grad|| / ||W||`` at steps 1, 10, 50, 100 (gradient norms from ``lightning.pytorch.utilities.grad_norm``),
- ``||W_after - W_before|| / ||W_before||`` of those optimizer steps (Adam's actual update),
- ``||W_T - W_0|| / ||W_0||`` and the angle between ``W_0`` and ``W_T`` over the run: every conv is followed by
  a parameter-free batch norm, so only the direction of its weights changes what the network computes.

Validation loss (and bin accuracy of flow_classification) on the folder's val split before and after.

    .venv/bin/python benchmarks/pretrain_gradients.py --data DIR   # ~20 min on 2 cores; writes results/pretrain_gradients.md

``DIR`` is a ``crossflow prepare`` output at the demo's settings (``make demo-data``, or a smaller one:
``crossflow synth videos --num-videos 128 --seed 0`` then the Makefile's prepare line). ``--save DIR`` keeps each
run's final checkpoint (``crossflow export`` turns it into a backbone file).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import grad_norm

from crossflow.data.pairs import PairDataModule
from crossflow.files import write_text_atomic
from crossflow.module import CrossFlowPretraining

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "demo.yaml"
RUNS = (("cross_pixel", 1e-3), ("flow_classification", 1e-3), ("flow_classification", 1e-2))
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "head")
STEPS = (1, 10, 50, 100)


def layer_modules(module: CrossFlowPretraining) -> dict[str, torch.nn.Module]:
    layers = {name: module.backbone.layers[name] for name in LAYERS[:-1]}
    return {**layers, "head": module.head}


def flat(layer: torch.nn.Module) -> torch.Tensor:
    """A layer's parameters as one vector (a copy)."""
    return torch.cat([p.detach().flatten() for p in layer.parameters()]).clone()


class LayerNorms(L.Callback):
    """Per-layer gradient/weight ratios and update sizes at ``steps``, and the change over the whole run."""

    def __init__(self, steps: tuple[int, ...]):
        self.steps = steps
        self.ratios: dict[int, dict[str, float]] = {}  # step -> layer -> ||grad|| / ||W||
        self.updates: dict[int, dict[str, float]] = {}  # step -> layer -> ||W_after - W_before|| / ||W_before||
        self.before: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {name: flat(layer) for name, layer in layer_modules(pl_module).items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1  # the step this gradient is for, counted from 1
        if step not in self.steps:
            return
        self.ratios[step] = {}
        for name, layer in layer_modules(pl_module).items():
            norm = grad_norm(layer, 2).get("grad_2.0_norm_total", torch.tensor(0.0))
            self.before[name] = flat(layer)
            self.ratios[step][name] = float(norm) / float(self.before[name].norm())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index) -> None:
        if trainer.global_step not in self.steps or trainer.global_step not in self.ratios:
            return
        self.updates[trainer.global_step] = {
            name: float((flat(layer) - self.before[name]).norm() / self.before[name].norm())
            for name, layer in layer_modules(pl_module).items()
        }

    def change(self, pl_module) -> dict[str, tuple[float, float]]:
        """layer -> (||W_T - W_0|| / ||W_0||, angle(W_0, W_T) in degrees)."""
        result = {}
        for name, layer in layer_modules(pl_module).items():
            now, start = flat(layer), self.initial[name]
            cosine = float(torch.dot(now, start) / (now.norm() * start.norm()))
            result[name] = (float((now - start).norm() / start.norm()), math.degrees(math.acos(max(-1.0, min(1.0, cosine)))))
        return result


def run(objective: str, lr: float, data: str, steps: int, save: Path | None) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    L.seed_everything(config["seed_everything"], verbose=False)
    model = CrossFlowPretraining(**{**config["model"]["init_args"], "objective": objective, "lr": lr})
    datamodule = PairDataModule(**{**config["data"]["init_args"], "data_dir": data})
    norms = LayerNorms(tuple(s for s in STEPS if s <= steps))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[norms], num_sanity_val_steps=0,
                        limit_val_batches=0, precision=config["trainer"]["precision"])
    validator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    before = validator.validate(model, datamodule=datamodule, verbose=False)[0]
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    after = validator.validate(model, datamodule=datamodule, verbose=False)[0]
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(save / f"{objective}_lr{lr:g}.ckpt")
    return {"objective": objective, "lr": lr, "ratios": norms.ratios, "updates": norms.updates, "change": norms.change(model),
            "val_before": before, "val_after": after, "seconds": seconds, "steps": trainer.global_step}


def table(results: list[dict]) -> list[str]:
    steps = sorted(results[0]["ratios"])
    columns = ["run", "layer", *(f"‖g‖/‖W‖ step {s}" for s in steps), *(f"‖ΔW‖/‖W‖ of step {s}" for s in steps),
               "‖W_T − W_0‖/‖W_0‖", "angle(W_0, W_T)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        for layer in LAYERS:
            change, angle = result["change"][layer]
            cells = [f"{result['objective']} lr {result['lr']:g}", layer,
                     *(f"{result['ratios'][s][layer]:.2e}" for s in steps), *(f"{result['updates'][s][layer]:.2e}" for s in steps),
                     f"{change:.3f}", f"{angle:.1f}°"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def validation_lines(results: list[dict]) -> list[str]:
    lines = ["| run | val/loss at step 0 | val/loss after | val/bin_accuracy at step 0 | after | train s |", "|---|---|---|---|---|---|"]
    for r in results:
        accuracy = [f"{r[k]['val/bin_accuracy']:.3f}" if "val/bin_accuracy" in r[k] else "–" for k in ("val_before", "val_after")]
        lines.append(f"| {r['objective']} lr {r['lr']:g} | {r['val_before']['val/loss']:.4f} | {r['val_after']['val/loss']:.4f} | "
                     f"{accuracy[0]} | {accuracy[1]} | {r['seconds']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a crossflow prepare output (index.json) at the demo's settings")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save", type=Path, help="folder for each run's final checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain_gradients.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [run(objective, lr, args.data, args.steps, args.save) for objective, lr in RUNS]
    index = json.loads((Path(args.data) / "index.json").read_text())
    pairs = {split: index["splits"][split]["num_samples"] for split in ("train", "val")}
    lines = ["# pretraining gradients per layer", "", *table(results), "", *validation_lines(results), "",
             f"- configs/pretrain/demo.yaml's model and data (128 px crops, batch 32, 256 points, taps conv1, pool1, conv3, pool5, "
             f"Adam), {args.steps} steps each, seed 0; data {args.data}: {pairs['train']} train / {pairs['val']} val pairs.",
             "- ‖g‖/‖W‖: gradient norm (lightning.pytorch.utilities.grad_norm) over weight norm of the layer's parameters "
             "(conv: weight and bias; head: both linear layers), before that step's update; ‖ΔW‖/‖W‖: that update's size. "
             "Each conv is followed by a parameter-free batch norm: its output ignores the weights' scale, so the angle "
             "is the change that matters for conv1..conv5.",
             "- val: the folder's val split (centre crops), before training and after the last step.",
             f"- Machine: {platform.machine()}, torch {torch.__version__}, 2 threads; 2-core x86-64 CPU, 24 GB, no GPU; "
             "shared with other jobs."]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
