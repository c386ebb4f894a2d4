"""A training DataLoader that a checkpoint resumes mid-epoch with the same samples, in the same order, augmented the same.

Lightning saves the ``state_dict()`` of a training DataLoader that has one and gives it back through
``load_state_dict`` before it iterates again (``fit --ckpt_path``). :class:`ResumableLoader` makes what it yields a
pure function of (seed, epoch, position), so that state is just ``{"epoch", "batches"}``:

- order: :class:`EpochSampler`, torch's ``DistributedSampler`` (a permutation from ``seed + epoch``; under DDP the
  process's share, and Lightning leaves a ``DistributedSampler`` in place), started ``batches * batch_size`` items
  into the epoch after a resume: the skipped items are never read or decoded;
- augmentation: item ``i`` of epoch ``e`` is made with torch, NumPy and ``random`` seeded from ``(seed, e, i)``
  (:class:`SeededItems`), whichever worker makes it, for datasets whose transforms draw from those global generators
  (torchvision's). A dataset that seeds itself per epoch and sample (:class:`crossflow.data.pairs.PairShards`)
  needs only its ``set_epoch``, which the sampler calls.

Written here rather than taken from torchdata's ``StatefulDataLoader``: that counts batches handed out, which under
Lightning's one-batch prefetch is one more than were trained on, and it restores a random sampler's generator but
not the augmentation drawn in workers. The position here is the trainer's count of batches trained this epoch.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (LightningCLI sets it from the config), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True, seed)`` of this process (the whole dataset on one process) that can start
    ``start`` items into an epoch, once; ``keyed`` yields ``(epoch, index)`` for :class:`SeededItems`."""

    def __init__(self, dataset: Dataset, seed: int, keyed: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.keyed, self.start = keyed, 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter([(self.epoch, i) for i in indices] if self.keyed else indices)


class SeededItems(Dataset):
    """``dataset`` whose item for key ``(epoch, i)`` is made under ``torch``/``numpy``/``random`` seeded from
    ``(seed, epoch, i)``, the caller's generator states restored afterwards. A plain index ``i`` is ``dataset[i]``
    as it is; other attributes are the dataset's."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                np.random.seed(seed)
                random.seed(seed)
                return self.dataset[index]
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableLoader(DataLoader):
    """A shuffling training DataLoader whose position Lightning checkpoints (see the module docstring).

    Args:
        dataset, batch_size, **kwargs: as DataLoader (no ``shuffle`` or ``sampler``: the :class:`EpochSampler` is its own).
        seed: the order's and (with ``seed_items``) the augmentation's seed.
        trainer: the Lightning trainer, whose count of batches trained this epoch is the saved position.
        seed_items: wrap ``dataset`` in :class:`SeededItems` (datasets augmenting with the global generators).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, trainer=None, seed_items: bool = False, **kwargs):
        items = SeededItems(dataset, seed) if seed_items else dataset
        super().__init__(items, batch_size, sampler=EpochSampler(items, seed, keyed=seed_items), **kwargs)
        self.trainer, self.resume_at = trainer, None

    def __iter__(self):
        # The epoch is the trainer's, except on a resume's first iteration, which is the saved position's: Lightning's
        # own set_epoch numbers run one ahead after some resumes (a checkpoint saved between an epoch's end hooks), and
        # a checkpoint saved on an epoch's last batch resumes with trainer.current_epoch still at that finished epoch.
        epoch, start = (self.trainer.current_epoch if self.trainer is not None else self.sampler.epoch), 0
        if self.resume_at is not None:
            saved_epoch, batches = self.resume_at
            epoch, start = (saved_epoch, batches * self.batch_size) if batches < len(self) else (saved_epoch + 1, 0)
            self.resume_at = None
        self.sampler.set_epoch(epoch)
        self.sampler.start = start
        return super().__iter__()

    def batches_done(self) -> int:
        """Batches of the current epoch trained on: the trainer's count (Lightning fetches a batch ahead, so the
        loader's own count of batches handed out is one more); 0 without a trainer."""
        return 0 if self.trainer is None else self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration is of epoch ``epoch`` from its batch ``batches``, or, if that epoch was finished, of the
        next epoch from its start (where Lightning goes on)."""
        self.resume_at = (state["epoch"], state["batches"])
