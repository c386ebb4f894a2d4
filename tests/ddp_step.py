"""One optimisation step of the pretraining module with Lightning, on CPU, saving the parameters.

Run by tests/test_ddp.py either as one process or under `torch.distributed.run` with 2
processes (gloo); the global batch is the same 4 samples in both cases. torch's SyncBatchNorm
runs only on GPUs, so on CPU each process normalises with its own batch statistics; the single
process reproduces that with two accumulated micro-batches holding the samples each rank gets
(rank r takes samples r and r + 2).

    python tests/ddp_step.py PAIRS_DIR OUT.pt DEVICES
"""

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from crossflow.data.pairs import Augmentation, PairShards, collate_skipping_failures
from crossflow.cli import close_process_group
from crossflow.module import CrossFlowPretraining


def main(pairs_dir: str, out: str, devices: int) -> None:
    L.seed_everything(0)
    # eps = 1 makes Adam's first update proportional to the gradient instead of ~sign(gradient),
    # so the comparison is sensitive to gradient values, not only to their signs.
    module = CrossFlowPretraining(taps=["conv1", "pool1", "conv3", "pool5"], hidden_dim=32, eps=1.0, lr=0.1)
    pairs = PairShards(pairs_dir, "train", Augmentation(64, train=False), num_points=32)
    order = [int(os.environ["RANK"]), int(os.environ["RANK"]) + 2] if devices > 1 else [0, 2, 1, 3]
    loader = DataLoader(Subset(pairs, order), batch_size=2, shuffle=False, collate_fn=collate_skipping_failures)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        accumulate_grad_batches=1 if devices > 1 else 2, use_distributed_sampler=False, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in module.named_parameters()}, out)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
