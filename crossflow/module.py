"""The pretraining LightningModule: AlexNet -> sparse hypercolumn -> MLP -> loss.

Objectives:
    ``cross_pixel``          D-dimensional embeddings, cross-pixel optical-flow similarity loss (the paper's method);
    ``flow_classification``  2 x K logits per pixel, flow discretised into K bins ("Ours direct reg." baseline).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import lightning as L
import torch
from torch import nn

from crossflow.losses import cross_pixel_similarity_loss, flow_classification_loss, flow_target_entropy, flow_to_bins
from crossflow.models.alexnet import LAYERS, AlexNet
from crossflow.models.hypercolumn import HypercolumnMLP

Objective = Literal["cross_pixel", "flow_classification"]


class CrossFlowPretraining(L.LightningModule):
    """Self-supervised pretraining from (frame, flow) batches of :class:`crossflow.data.pairs.PairDataModule`.

    Args:
        objective: ``cross_pixel`` (paper) or ``flow_classification`` (direct baseline).
        taps: backbone layers in the hypercolumn (paper: conv1, pool1, conv3, pool5, fc7;
            fc6/fc7 need inputs of at least 193 px, where pool5 is 6x6).
        hidden_dim: width of the MLP's hidden layer.
        embedding_dim: D of the embedding (paper: 16).
        num_bins: K bins per flow component for ``flow_classification``.
        sigma2_init: initial flow-kernel bandwidth sigma^2 (learned as log sigma^2, so it stays positive).
        groups: 1, or 2 for CaffeNet's grouped convolutions.
        lr, betas, eps, weight_decay: Adam (paper: 1e-4, (0.9, 0.999), 1e-8, 0).
        channels_last: run the backbone in channels-last memory format (faster on GPUs with tensor cores, and on the
            CPU: 9% at the paper config's forward + backward, 7.25 -> 6.57 s on one thread).
    """

    def __init__(
        self,
        objective: Objective = "cross_pixel",
        taps: list[str] = ["conv1", "pool1", "conv3", "pool5", "fc7"],  # noqa: B006 (jsonargparse reads defaults)
        hidden_dim: int = 1024,
        embedding_dim: int = 16,
        num_bins: int = 16,
        sigma2_init: float = 0.01,
        groups: int = 1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = AlexNet(batch_norm=True, groups=groups)
        for name in LAYERS[max(LAYERS.index(t) for t in taps) + 1 :]:
            self.backbone.layers[name].requires_grad_(False)  # never run: no gradient, and DDP sees no unused parameter
        self.geometry = self.backbone.geometry
        out_dim = embedding_dim if objective == "cross_pixel" else 2 * num_bins
        self.head = HypercolumnMLP(sum(self.backbone.channels[t] for t in taps), hidden_dim, out_dim)
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(sigma2_init)), requires_grad=objective == "cross_pixel")
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._last_step_time: float | None = None

    @property
    def sigma2(self) -> torch.Tensor:
        return self.log_sigma2.exp()

    def forward(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """image ``[B, 3, H, W]``, points ``[B, N, 2]`` (x, y) -> head output ``[B, N, D]`` (or ``[B, N, 2, K]``)."""
        taps = self.hparams.taps
        activations = self.backbone_taps(image)
        output = self.head.forward_at_points(activations, points, self.geometry, taps)
        if self.hparams.objective == "flow_classification":
            output = output.unflatten(-1, (2, self.hparams.num_bins))
        return output

    def backbone_taps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's activations at the hypercolumn's taps: images ``[B, 3, H, W]`` -> ``{tap: [B, C, h, w]}``."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images, self.hparams.taps)

    @torch.no_grad()
    def dense_output(self, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """The head at every pixel, ``chunk`` pixels at a time (:meth:`HypercolumnMLP.forward_dense`, as the segmentation
        eval): images ``[B, 3, H, W]`` -> ``[B, D, H, W]`` (or ``[B, 2K, H, W]`` logits for ``flow_classification``)."""
        taps = self.hparams.taps
        return self.head.forward_dense(self.backbone_taps(images), self.geometry, taps, tuple(images.shape[-2:]), chunk)

    def dense_embeddings(self, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Unit embeddings ``phi_p / ||phi_p||`` at every pixel: ``[B, 3, H, W]`` -> ``[B, D, H, W]`` (no gradient)."""
        if self.hparams.objective != "cross_pixel":
            raise ValueError("a flow_classification (direct baseline) model has no embedding: its head predicts flow bins")
        return torch.nn.functional.normalize(self.dense_output(images, chunk), dim=1)

    def objective_loss(self, output: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        if self.hparams.objective == "cross_pixel":
            return cross_pixel_similarity_loss(output, flow, self.sigma2)
        return flow_classification_loss(output, flow)

    def count_skipped(self, batch: dict, stage: str) -> bool:
        """Log how many samples of the batch failed to decode (``<stage>/skipped_samples``, summed over the epoch
        and the processes); True when none is left to train or validate on."""
        self.log(f"{stage}/skipped_samples", float(batch.get("skipped", 0)), reduce_fx="sum", on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=1)
        return "key" not in batch

    def training_step(self, batch: dict, batch_index: int):
        if self.count_skipped(batch, "train"):  # every sample of the batch failed to decode (warned by the dataset)
            return None
        loss = self.objective_loss(self(batch["image"], batch["points"]), batch["flow"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} on samples {list(batch['key'])}; "
                "the last saved checkpoint is untouched (resume from it with --ckpt_path, maybe with a lower lr)"
            )
        self.log("train/loss", loss, prog_bar=True)
        if self.hparams.objective == "cross_pixel":
            self.log("train/sigma2", self.sigma2.detach())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_index: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None and "key" in batch:
            images = len(batch["key"]) * self.trainer.world_size
            self.log("train/images_per_sec", images / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def validation_step(self, batch: dict, batch_index: int) -> None:
        if self.count_skipped(batch, "val"):
            return
        output = self(batch["image"], batch["points"])
        loss = self.objective_loss(output, batch["flow"])
        batch_size = len(batch["key"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if self.hparams.objective == "cross_pixel":
            entropy = flow_target_entropy(batch["flow"], self.sigma2)
            self.log("val/loss_minus_target_entropy", loss - entropy, sync_dist=True, batch_size=batch_size)
        else:
            accuracy = (output.argmax(-1) == flow_to_bins(batch["flow"], self.hparams.num_bins)).float().mean()
            self.log("val/bin_accuracy", accuracy, sync_dist=True, batch_size=batch_size)

    def configure_optimizers(self):
        h = self.hparams
        # fused: one kernel for all parameters (CPU and CUDA); at the paper config (63M parameters, fc6/fc7 included) a
        # step of Adam takes 38 ms instead of 312 ms on one CPU thread, the same values to float rounding
        return torch.optim.Adam(self.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay, fused=True)
