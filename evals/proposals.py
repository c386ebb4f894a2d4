"""Object proposals for Fast R-CNN: selective search computed once and cached, or the user's files.

Proposal file format (what the cache writes and what user files must follow): a folder
holding one ``<image_id>.npy`` per image, a float32 array ``[N, 4]`` of boxes
``x1, y1, x2, y2`` in 0-based pixel coordinates of the original image with inclusive
ends (a box covering one pixel has x1 == x2), best-ranked first. Filtering (minimum
size, duplicates) and the cap on the number per image are applied when reading, so one
cache serves any setting.

Selective search (Uijlings et al.) in OpenCV contrib's "fast" mode is the Fast R-CNN
proposal method. Computation runs in parallel processes with a progress bar; each file
is written atomically, so an interrupted run resumes where it stopped. OpenCV ranks the
boxes with the C library's ``rand()`` (rank = random x hierarchy level), so the C random
state is reset before each image: the same image always gives the same boxes in the same order.
The Fast R-CNN authors' own selective-search boxes (``voc_2007_{trainval,test}.mat``)
convert to this format with ``python -m evals.proposals import-mat FILE.mat OUT_DIR``.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import remove_small_boxes
from tqdm import tqdm

from crossflow.errors import InvalidInputError, MissingInputError

MODES = ("fast", "quality", "single")


def seed_c_rand(seed: int) -> None:
    """Reset the C library's ``rand()`` of this process (POSIX: the libc every extension links against)."""
    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, TypeError, AttributeError):  # no POSIX libc (Windows): box order may vary between runs
        pass


def selective_search(image_rgb: np.ndarray, mode: str = "fast") -> np.ndarray:
    """RGB ``[H, W, 3]`` uint8 -> boxes ``[N, 4]`` float32 (x1, y1, x2, y2 inclusive), best first, no duplicates."""
    import cv2

    cv2.setNumThreads(1)
    seed_c_rand(0)  # OpenCV's box ranking draws from rand(): same image, same order
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # OpenCV wants BGR
    {"fast": search.switchToSelectiveSearchFast, "quality": search.switchToSelectiveSearchQuality, "single": search.switchToSingleStrategy}[mode]()
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] - 1], axis=1)
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def filter_proposals(boxes: np.ndarray, max_proposals: int, min_size: float) -> torch.Tensor:
    """Cached boxes ``[N, 4]`` -> ``[<=max_proposals, 4]`` float32: no box narrower/shorter than ``min_size`` pixels."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    keep = remove_small_boxes(boxes + boxes.new_tensor([0, 0, 1, 1]), min_size)  # +1: inclusive ends
    return boxes[keep[:max_proposals]]


def write_atomic(path: Path, boxes: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, boxes.astype(np.float32))
    os.replace(partial, path)


def _compute_one(job: tuple[str, str, str, str]) -> str:
    from evals.voc import read_rgb

    image_id, image_path, out_path, mode = job
    write_atomic(Path(out_path), selective_search(read_rgb(image_path), mode))
    return image_id


class ProposalStore:
    """Per-image proposal files in ``folder`` (see the module doc for the format).

    Args:
        folder: where the ``<image_id>.npy`` files are (or go).
        compute: compute missing files by selective search (else a missing file is an error).
        mode: selective search mode, "fast" (Fast R-CNN's), "quality" or "single".
        max_proposals: at most this many per image (the best-ranked).
        min_size: drop boxes narrower or shorter than this many pixels.
    """

    def __init__(self, folder: str | Path, compute: bool = True, mode: str = "fast", max_proposals: int = 2000, min_size: float = 20):
        if mode not in MODES:
            raise InvalidInputError(f"selective search mode {mode!r}; choose from {MODES}")
        self.folder = Path(folder)
        self.compute = compute
        self.mode = mode
        self.max_proposals = max_proposals
        self.min_size = min_size

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npy"

    def missing(self, image_ids: list[str]) -> list[str]:
        return [i for i in image_ids if not self.path(i).is_file()]

    def prepare(self, images: dict[str, Path], workers: int = 0) -> int:
        """Make sure every image ``{image_id: image path}`` has a file; returns how many were computed now."""
        todo = self.missing(list(images))
        if not todo:
            return 0
        if not self.compute:
            raise MissingInputError(
                f"{len(todo)} proposal files missing in {self.folder} (e.g. {self.path(todo[0])}): expected one "
                "<image_id>.npy per image, float32 [N, 4] x1,y1,x2,y2 0-based inclusive pixels, best first; "
                "set compute_proposals: true to compute them by selective search"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidInputError(f"cannot create the proposal folder {self.folder} ({error.strerror}): set proposal_dir to a writable folder") from None
        if not os.access(self.folder, os.W_OK):
            raise InvalidInputError(f"cannot write proposals in {self.folder} (read-only): set proposal_dir to a writable folder")
        jobs = [(i, str(images[i]), str(self.path(i)), self.mode) for i in todo]
        progress = tqdm(total=len(jobs), desc=f"selective search ({self.mode}) -> {self.folder}", unit="img")
        if workers <= 1:
            for job in jobs:
                _compute_one(job)
                progress.update()
        else:
            # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock the children
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_compute_one, jobs, chunksize=4):
                    progress.update()
        progress.close()
        return len(jobs)

    def load(self, image_id: str) -> torch.Tensor:
        """Filtered proposals ``[N, 4]`` float32 of one image (original image pixels)."""
        path = self.path(image_id)
        if not path.is_file():
            raise MissingInputError(f"no proposal file {path}; run the data module's prepare_data (or see evals/proposals.py for the format)")
        return filter_proposals(np.load(path), self.max_proposals, self.min_size)


def import_fast_rcnn_mat(mat_path: str | Path, folder: str | Path) -> int:
    """Fast R-CNN's ``selective_search_data/voc_2007_<split>.mat`` (cells ``images`` and ``boxes``,
    boxes y1, x1, y2, x2 1-based) -> one ``<image_id>.npy`` per image in ``folder``; returns the count."""
    from scipy.io import loadmat

    data = loadmat(str(mat_path))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids, boxes = data["images"].ravel(), data["boxes"].ravel()
    for image_id, image_boxes in zip(ids, boxes):
        write_atomic(folder / f"{str(np.ravel(image_id)[0])}.npy", image_boxes[:, (1, 0, 3, 2)].astype(np.float32) - 1)
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.proposals", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("import-mat", help="convert Fast R-CNN's selective search .mat into per-image .npy files")
    convert.add_argument("mat")
    convert.add_argument("out")
    args = parser.parse_args(argv)
    print(f"wrote {import_fast_rcnn_mat(args.mat, args.out)} proposal files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
