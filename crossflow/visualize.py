"""`crossflow visualize CHECKPOINT INPUT... --out DIR`: pictures of what a pretraining run learned.

Per frame (the paper's figs. 4 and 2), and once per run (fig. 5)::

    <name>_embedding.png   frame | flow (eq. 6 normalised, colour wheel) | embedding phi projected to RGB
                           (flow_classification: frame | flow | predicted flow, at the argmax bins' centres)
    <name>_kernels.png     one row per pixel p: frame with p marked | K_f(p, .) | K_phi(p, .)
    conv5_stimuli.png      optimal stimuli of conv5 channels: random initialisation | this network

Inputs: prepared pairs (a folder holding ``index.json``; frame and flow from its shards), video files
(frame t with flow t -> t+gap by :func:`crossflow.flow.estimate_flow`), image files and folders (each image
with the next image of the folder, in name order, as its second frame; the last one, or one whose next
image differs in size, is a still: no flow and no K_f). Frames are resized to a short side of the
checkpoint's training crop and normalised as in training.

The library functions below are what the training callback :class:`crossflow.callbacks.EmbeddingPanels`
logs too; images are torch ``uint8 [3, H, W]`` unless said otherwise.
"""

from __future__ import annotations

import argparse
import re
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.utils import draw_keypoints, flow_to_image, make_grid

from crossflow.checkpoints import load_checkpoint
from crossflow.data.pairs import Augmentation, PairShards, normalize_image, read_index
from crossflow.data.prepare import (
    VIDEO_EXTENSIONS,
    SkipVideo,
    count_frames,
    parse_method,
    read_frames,
    resize_short_side,
)
from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.export import load_pretraining_checkpoint
from crossflow.flow import estimate_flow, normalize_flow
from crossflow.losses import EMBEDDING_KERNEL_SCALE, embedding_kernel, flow_kernel
from crossflow.models.alexnet import LAYERS, AlexNet
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD, fold_batch_norm
from crossflow.module import CrossFlowPretraining

GRID_PADDING = 2
BASELINE_NOTE = (
    "{checkpoint} is a flow_classification (direct baseline) checkpoint: its head predicts flow bins, not an "
    "embedding, so there are no embedding or kernel pictures; drawing frame, flow, predicted flow and conv5 stimuli"
)


# ----------------------------------------------------------------------------------------------- embeddings
def random_projection(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed random projection ``P [dim, 3]`` with orthonormal columns (QR of a Gaussian seeded by ``seed``)."""
    gaussian = torch.randn(dim, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q.float()


def embedding_to_rgb(embeddings: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Unit embeddings ``[B, D, H, W]`` -> colours ``[B, 3, H, W]`` in [0, 1] (the paper's fig. 4).

    ``rgb = clamp(0.5 + sqrt(D) / 4 * P^T phi, 0, 1)`` with ``P = random_projection(D, seed)``: the same
    projection and scale for every image of a seed (a random unit phi's coordinates have std 1/sqrt(D),
    so +-2 std span the colour range).
    """
    dim = embeddings.shape[1]
    projected = torch.einsum("bdhw,dc->bchw", embeddings.float(), random_projection(dim, seed).to(embeddings.device))
    return (0.5 + dim**0.5 / 4 * projected).clamp(0, 1)


def predicted_flow(logits: torch.Tensor) -> torch.Tensor:
    """Flow-classification logits ``[B, 2K, H, W]`` -> normalised flow ``[B, 2, H, W]`` at the argmax bins' centres
    (bin ``k`` of ``K`` uniform bins over [-1, 1] has centre ``(2k + 1) / K - 1``)."""
    num_bins = logits.shape[1] // 2
    bins = logits.unflatten(1, (2, num_bins)).argmax(2)
    return (2 * bins + 1) / num_bins - 1


# ----------------------------------------------------------------------------------------------- kernel rows
def _pairs_with(values: torch.Tensor, point: tuple[int, int]) -> torch.Tensor:
    """``values [C, H, W]`` -> ``[H*W, 2, C]``: for every pixel q the pair (value at p, value at q)."""
    x, y = point
    flat = values.flatten(1).T  # [H*W, C]
    return torch.stack([values[:, y, x].expand_as(flat), flat], dim=1)


def flow_kernel_row(flow: torch.Tensor, point: tuple[int, int], sigma2: torch.Tensor | float) -> torch.Tensor:
    """``K_f(p, .) = exp(-||f_p - f_q||^2 / (2 sigma^2))`` over the image: normalised flow ``[2, H, W]`` ->
    ``[H, W]``, computed by the loss's own :func:`crossflow.losses.flow_kernel` (1 at p)."""
    return flow_kernel(_pairs_with(flow, point), sigma2)[:, 0, 1].view(flow.shape[1:])


def embedding_kernel_row(embeddings: torch.Tensor, point: tuple[int, int]) -> torch.Tensor:
    """``K_phi(p, .) = 0.25 cos(phi_p, phi_q)`` over the image: embeddings ``[D, H, W]`` -> ``[H, W]``, computed by
    :func:`crossflow.losses.embedding_kernel` (0.25 at p)."""
    return embedding_kernel(_pairs_with(embeddings, point))[:, 0, 1].view(embeddings.shape[1:])


def choose_pixels(height: int, width: int, count: int, seed: int, valid: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``count`` distinct random pixels (x, y), among ``valid [H, W]`` ones when given (seeded)."""
    valid = np.ones((height, width), bool) if valid is None or not valid.any() else valid
    ys, xs = np.nonzero(valid)
    chosen = np.random.default_rng(seed).choice(len(xs), size=min(count, len(xs)), replace=False)
    return [(int(xs[i]), int(ys[i])) for i in chosen]


# ----------------------------------------------------------------------------------------------- drawing
def heatmap(values: torch.Tensor, low: float, high: float, point: tuple[int, int] | None = None) -> torch.Tensor:
    """``values [H, W]`` on the fixed range [low, high] -> viridis ``uint8 [3, H, W]``, ``point`` marked in red."""
    scaled = ((values.float().cpu() - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    colours = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    image = torch.from_numpy(colours).permute(2, 0, 1).contiguous()
    return image if point is None else mark(image, point)


def mark(image: torch.Tensor, point: tuple[int, int]) -> torch.Tensor:
    """``image`` with pixel ``point`` (x, y) drawn as a red dot ringed in white."""
    radius = max(2, min(image.shape[1:]) // 40)
    keypoint = torch.tensor([[point]], dtype=torch.float32)
    image = draw_keypoints(image, keypoint, colors="white", radius=radius + 1)
    return draw_keypoints(image, keypoint, colors="red", radius=radius)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """Writes ``uint8 [3, H, W]`` RGB as a PNG (OpenCV); returns ``path``."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def grid(images: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Equal-size ``uint8 [3, H, W]`` images -> one grid with ``columns`` columns on white (torchvision's make_grid)."""
    return make_grid(images, nrow=columns, padding=GRID_PADDING, pad_value=255)


def embedding_panel(frame: torch.Tensor, flow: torch.Tensor | None, output: torch.Tensor | None, objective: str, seed: int = 0) -> torch.Tensor:
    """One row: frame | flow | embedding as RGB (or predicted flow for ``flow_classification``).

    frame ``uint8 [3, H, W]``; flow ``[2, H, W]`` normalised (eq. 6) or None (a still); output the dense head
    output ``[D, H, W]`` (unit embeddings, or ``[2K, H, W]`` logits). The true and predicted flow share one colour
    scale (torchvision's flow_to_image scales a batch by its largest vector).
    """
    flows = [] if flow is None else [flow]
    if objective == "flow_classification":
        flows.append(predicted_flow(output[None])[0])
    images = [frame, *flow_to_image(torch.stack(flows).float().cpu())] if flows else [frame]
    if objective == "cross_pixel":
        images.append((embedding_to_rgb(output[None], seed)[0].cpu() * 255).round().to(torch.uint8))
    return grid(images, len(images))


def kernel_panel(frame: torch.Tensor, flow: torch.Tensor | None, embeddings: torch.Tensor, points: list[tuple[int, int]], sigma2: float) -> torch.Tensor:
    """One row per pixel p of ``points``: frame with p marked | K_f(p, .) on [0, 1] | K_phi(p, .) on [-0.25, 0.25].

    flow ``[2, H, W]`` normalised, or None (a still: no K_f column); embeddings ``[D, H, W]``. Both heatmaps are
    at the top of their colour range (yellow) at p.
    """
    images = []
    for point in points:
        images.append(mark(frame, point))
        if flow is not None:
            images.append(heatmap(flow_kernel_row(flow, point, sigma2), 0.0, 1.0, point))
        images.append(heatmap(embedding_kernel_row(embeddings, point), -EMBEDDING_KERNEL_SCALE, EMBEDDING_KERNEL_SCALE, point))
    return grid(images, len(images) // len(points))


def frame_panels(
    module: CrossFlowPretraining, frame: np.ndarray, flow: np.ndarray | None, points: list[tuple[int, int]],
    max_magnitude: float = 56.0, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pictures of one frame: (embedding panel, kernel panel or None for ``flow_classification``).

    frame ``[H, W, 3]`` uint8 RGB at the size the network sees; flow ``[H, W, 2]`` in pixels or None; ``module``
    in eval mode. The dense head output comes from :meth:`CrossFlowPretraining.dense_output`.
    """
    image = normalize_image(frame)[None].to(module.device)
    output = module.dense_output(image)[0]
    normalised = None if flow is None else torch.from_numpy(normalize_flow(flow, max_magnitude)).permute(2, 0, 1).to(module.device)
    picture = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous()
    objective = module.hparams.objective
    panel = embedding_panel(picture, normalised, output, objective, seed)
    if objective != "cross_pixel":
        return panel, None
    embeddings = F.normalize(output, dim=0)
    return panel, kernel_panel(picture, normalised, embeddings, points, module.sigma2.item())


# ----------------------------------------------------------------------------------------------- activation maximisation
@dataclass
class Stimuli:
    """Result of :func:`maximise_activation`: ``images [C, 3, S, S]`` RGB in [0, 1] (each stretched to its own
    range for display), and the target activation of each channel at the ``initial`` and ``final`` input ``[C]``."""

    images: torch.Tensor
    initial: torch.Tensor
    final: torch.Tensor


def random_like(network: AlexNet, seed: int = 0) -> AlexNet:
    """A copy of ``network`` (same architecture and device, eval mode) at a random initialisation drawn from ``seed``
    (the global RNG is left as it was)."""
    copy = deepcopy(network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy.reset_parameters()
    return copy.eval()


def neuron_activation(network: AlexNet, images: torch.Tensor, channels: list[int], layer: str = "conv5") -> torch.Tensor:
    """Pre-ReLU response of channel ``channels[i]`` at the centre of ``layer``'s map for image ``i``:
    images ``[C, 3, S, S]`` -> ``[C]`` (``layer`` a conv layer; the network in eval mode)."""
    block = network.layers[layer]
    previous = LAYERS[LAYERS.index(layer) - 1]
    response = block[:-1](network(images, (previous,))[previous])  # conv (+ BN), without the ReLU
    height, width = response.shape[-2:]
    return response[torch.arange(len(channels)), torch.as_tensor(channels), height // 2, width // 2]


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """``mean_p ||grad x(p)||^2`` per image (squared finite differences): ``[C, 3, S, S]`` -> ``[C]``."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).square().mean(dim=(1, 2, 3))
    dy = (images[..., 1:, :] - images[..., :-1, :]).square().mean(dim=(1, 2, 3))
    return dx + dy


def maximise_activation(
    network: AlexNet, channels: list[int], layer: str = "conv5", size: int = 128, steps: int = 100, lr: float = 0.1,
    jitter: int = 8, blur_sigma: float = 1.0, blur_every: int = 4, tv_weight: float = 4.0, decay: float = 0.02, seed: int = 0,
) -> Stimuli:
    """Activation maximisation with a natural-image prior: for each channel c_i, by Adam on its own input x_i,

        max_x  a_{c_i}(jitter(x)) - tv_weight * TV(x),   then x <- (1 - decay) x, clip to valid RGB,
        and every ``blur_every`` steps x <- gaussian_blur(x, blur_sigma)

    where a is the pre-ReLU centre response of :func:`neuron_activation`, ``jitter`` a random circular shift of up
    to ``jitter`` pixels each step, and x (normalised with IMAGE_MEAN/STD) starts from seeded noise around the
    mean colour. The network is not changed.
    """
    generator, device = torch.Generator().manual_seed(seed), next(network.parameters()).device
    mean, std = torch.tensor(IMAGE_MEAN, device=device).view(3, 1, 1), torch.tensor(IMAGE_STD, device=device).view(3, 1, 1)
    low, high = -mean / std, (1 - mean) / std
    images = (0.1 * torch.randn(len(channels), 3, size, size, generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    with torch.no_grad():
        initial = neuron_activation(network, images, channels, layer)
    for step in range(steps):
        shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist() if jitter else [0, 0]
        response = neuron_activation(network, images.roll(shift, dims=(2, 3)), channels, layer)
        loss = (tv_weight * total_variation(images) - response).sum()
        optimizer.zero_grad()
        loss.backward(inputs=[images])
        optimizer.step()
        with torch.no_grad():
            images.mul_(1 - decay)
            if blur_every and (step + 1) % blur_every == 0:
                images.copy_(TF.gaussian_blur(images, [2 * round(2 * blur_sigma) + 1] * 2, [blur_sigma] * 2))
            images.copy_(torch.maximum(torch.minimum(images, high), low))
    with torch.no_grad():
        final = neuron_activation(network, images, channels, layer)
        rgb = images * std + mean
        lowest, highest = rgb.amin(dim=(1, 2, 3), keepdim=True), rgb.amax(dim=(1, 2, 3), keepdim=True)
        display = (rgb - lowest) / (highest - lowest).clamp_min(1e-6)
    return Stimuli(display.cpu(), initial.cpu(), final.cpu())


def titled(image: torch.Tensor, title: str) -> torch.Tensor:
    """``uint8 [3, H, W]`` with a white strip above it holding ``title`` (OpenCV's Hershey font)."""
    strip = np.full((24, image.shape[2], 3), 255, np.uint8)
    cv2.putText(strip, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return torch.cat([torch.from_numpy(strip).permute(2, 0, 1), image], dim=1)


def stimuli_panel(random: Stimuli, trained: Stimuli, columns: int = 4) -> torch.Tensor:
    """The two sets of stimuli as grids side by side, titled: random initialisation | trained (the paper's fig. 5)."""
    grids = [titled(grid(list((s.images * 255).round().to(torch.uint8)), columns), title)
             for s, title in ((random, "random initialisation"), (trained, "trained"))]
    return grid(grids, 2)


# ----------------------------------------------------------------------------------------------- inputs
FlowMethod = tuple[str, dict]  # (name, parameters) as crossflow.data.prepare.parse_method returns them


@dataclass
class Frame:
    """One input frame at the network's size: ``rgb [H, W, 3]`` uint8, ``flow [H, W, 2]`` pixels (None: a still),
    ``valid [H, W]`` where the flow is known."""

    name: str
    rgb: np.ndarray
    flow: np.ndarray | None = None
    valid: np.ndarray | None = None


def read_image(path: Path) -> np.ndarray | None:
    """An image file -> ``[H, W, 3]`` uint8 RGB (grayscale and 16-bit converted), or None if it is not an image."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def frame_pair(name: str, frame0: np.ndarray, frame1: np.ndarray | None, size: int, method: FlowMethod) -> Frame:
    """RGB frames of one size -> a :class:`Frame` with short side ``size``, flow 0 -> 1 estimated at that size."""
    rgb = resize_short_side(frame0, size)
    if frame1 is None:
        return Frame(name, rgb)
    flow = estimate_flow(rgb, resize_short_side(frame1, size), method[0], **method[1])
    return Frame(name, rgb, flow, np.ones(rgb.shape[:2], bool))


def shard_frames(folder: Path, limit: int, size: int, max_magnitude: float) -> list[Frame]:
    """The first ``limit`` samples of prepared pairs (val split first), centre-cropped to ``size`` as in validation."""
    index, frames = read_index(folder), []
    for split in ("val", "train"):
        if len(frames) >= limit or not index["splits"].get(split, {}).get("shards"):
            continue
        dataset = PairShards(folder, split, Augmentation(size, train=False), num_points=1, max_magnitude=max_magnitude)
        for i in range(min(len(dataset), limit - len(frames))):
            sample = dataset.dense_sample(i)
            if sample is not None:
                frames.append(Frame(sample["key"], sample["frame"], sample["flow"], sample["valid"]))
    return frames


def video_frames(path: Path, limit: int, size: int, gap: int, method: FlowMethod) -> list[Frame]:
    """``limit`` evenly spaced frames t of a video, each with its flow t -> t+gap; [] (warned) if it does not decode."""
    try:
        packets = count_frames(str(path))
    except SkipVideo as skip:
        warnings.warn(f"skipping {path}: {skip}")
        return []
    times = sorted({int(t) for t in np.linspace(0, max(0, packets.num_frames - 1 - gap), limit)})
    decoded, _ = read_frames(str(path), times + [t + gap for t in times], packets)
    rgb = {t: cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for t, frame in decoded.items()}
    return [frame_pair(f"{path.stem}_t{t:05d}", rgb[t], rgb.get(t + gap), size, method) for t in times if t in rgb]


def image_frames(paths: list[Path], limit: int, size: int, method: FlowMethod, stills: bool) -> list[Frame]:
    """Images in the given order, each with the next one (same size) as its second frame unless ``stills``;
    files that are not images are skipped with a warning."""
    images = []
    for path in paths:
        image = read_image(path)
        if image is None:
            warnings.warn(f"skipping {path}: not an image OpenCV can read")
        else:
            images.append((path, image))
    frames = []
    for (path, image), following in zip(images[:limit], [*images[1:], None]):
        second = None if stills or following is None or following[1].shape != image.shape else following[1]
        frames.append(frame_pair(path.stem, image, second, size, method))
    return frames


def read_inputs(inputs: list[str], limit: int, size: int, gap: int, method: FlowMethod, stills: bool, max_magnitude: float) -> list[Frame]:
    """Every INPUT (pairs folder, video or image file, folder of videos and images, not recursive) -> up to ``limit``
    frames each (per video of a folder)."""
    frames = []
    for item in map(Path, inputs):
        if not item.exists():
            raise MissingInputError(f"input not found: {item} (give prepared pairs, a folder of images, videos or images)")
        if (item / "index.json").is_file():
            frames += shard_frames(item, limit, size, max_magnitude)
            continue
        files = sorted(p for p in item.iterdir() if p.is_file()) if item.is_dir() else [item]
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
        for video in videos:
            frames += video_frames(video, limit, size, gap, method)
        others = [p for p in files if p not in videos]
        if others:
            frames += image_frames(others, limit, size, method, stills)
    return frames


# ----------------------------------------------------------------------------------------------- command
def file_names(frames: list[Frame]) -> list[str]:
    """A distinct file-name stem per frame: its name with unsafe characters replaced, ``_2``, ``_3``... on repeats."""
    names, seen = [], {}
    for frame in frames:
        name = re.sub(r"[^\w.-]+", "_", frame.name)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def data_settings(checkpoint: Path) -> dict:
    """The training data's crop size and eq. 6 M from a checkpoint (224 and 56 when it has no data module)."""
    hparams = load_checkpoint(checkpoint).get("datamodule_hyper_parameters", {})
    return {"crop_size": int(hparams.get("crop_size", 224)), "max_magnitude": float(hparams.get("max_magnitude", 56.0))}


def check_input_size(module: CrossFlowPretraining, size: int) -> None:
    """Refuses (one line) a short side too small for the deepest tap of ``module``'s hypercolumn."""
    taps = module.hparams.taps
    try:
        with torch.no_grad():
            module.backbone(torch.zeros(1, 3, size, size, device=module.device), taps)
    except RuntimeError:
        raise InvalidInputError(f"--size {size} is too small for this network's hypercolumn ({', '.join(taps)}); "
                                f"use at least the training crop") from None


def draw_frames(module: CrossFlowPretraining, frames: list[Frame], out: Path, pixels: list[tuple[float, float]],
                max_magnitude: float, seed: int) -> list[Path]:
    """Writes ``<name>_embedding.png`` and (cross_pixel) ``<name>_kernels.png`` per frame; returns the paths."""
    written = []
    for index, (frame, name) in enumerate(zip(frames, file_names(frames))):
        height, width = frame.rgb.shape[:2]
        points = ([(min(width - 1, int(x * width)), min(height - 1, int(y * height))) for x, y in pixels]
                  or choose_pixels(height, width, 3, seed + index, frame.valid))
        panel, kernels = frame_panels(module, frame.rgb, frame.flow, points, max_magnitude, seed)
        for suffix, picture in (("embedding", panel), ("kernels", kernels)):
            if picture is not None:
                written.append(save_png(picture, out / f"{name}_{suffix}.png"))
    return written


def draw_stimuli(module: CrossFlowPretraining, out: Path, count: int, steps: int, size: int, seed: int) -> tuple[Path, Stimuli, Stimuli]:
    """conv5 stimuli of ``count`` random channels for a random AlexNet and for ``module``'s backbone (BN folded)."""
    channels = sorted(np.random.default_rng(seed).choice(module.backbone.specs["conv5"].out_channels, count, replace=False).tolist())
    backbone = fold_batch_norm(module.backbone).to(module.device)
    networks = (random_like(backbone, seed), backbone)
    random, trained = (maximise_activation(n, channels, size=size, steps=steps, seed=seed) for n in networks)
    path = save_png(stimuli_panel(random, trained), out / "conv5_stimuli.png")
    return path, random, trained


def parse_pixel(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y as fractions of the width and height, e.g. 0.5,0.5; got {text!r}") from None
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise argparse.ArgumentTypeError(f"X,Y are fractions of the width and height, in [0, 1]; got {text!r}")
    return x, y


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretraining checkpoint (.ckpt of `crossflow fit --config configs/pretrain/...`)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="prepared pairs (a folder with index.json), video files, image files or folders of images/videos")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--frames", type=int, default=4, help="frames per input: evenly spaced in a video, the first ones otherwise (default 4)")
    parser.add_argument("--gap", type=int, default=5, help="video frames between t and the second frame of the flow (default 5, as prepare)")
    parser.add_argument("--flow-method", default="dis", help="flow estimator for videos and images (crossflow.flow.FLOW_METHODS; default dis)")
    parser.add_argument("--stills", action="store_true", help="treat images as unrelated stills (no flow between neighbours)")
    parser.add_argument("--pixel", type=parse_pixel, action="append", default=[], metavar="X,Y",
                        help="a kernel pixel as fractions of the width and height (repeatable; default 3 random pixels per frame)")
    parser.add_argument("--size", type=int, default=None, help="short side fed to the network (default: the checkpoint's training crop)")
    parser.add_argument("--neurons", type=int, default=16, help="conv5 channels to visualise (0: none; default 16)")
    parser.add_argument("--steps", type=int, default=100, help="activation maximisation steps (default 100)")
    parser.add_argument("--stimulus-size", type=int, default=128, help="side of the activation maximisation inputs (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the RGB projection, pixels, channels and stimuli")


def run(args: argparse.Namespace) -> int:
    module = load_pretraining_checkpoint(args.checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
    settings = data_settings(Path(args.checkpoint))
    size = args.size or settings["crop_size"]
    if args.frames < 1 or size < 1 or args.neurons < 0 or args.gap < 1:
        raise InvalidInputError("--frames, --size and --gap must be positive and --neurons not negative")
    if args.neurons > module.backbone.specs["conv5"].out_channels:
        raise InvalidInputError(f"--neurons {args.neurons}: conv5 has {module.backbone.specs['conv5'].out_channels} channels")
    check_input_size(module, size)
    method = parse_method(args.flow_method)
    if module.hparams.objective != "cross_pixel":
        print(BASELINE_NOTE.format(checkpoint=args.checkpoint))
    frames = read_inputs(args.inputs, args.frames, size, args.gap, method, args.stills, settings["max_magnitude"])
    if not frames:
        raise InvalidInputError(f"no readable frames in {' '.join(args.inputs)} (see the warnings above)")
    stills = [f.name for f in frames if f.flow is None]
    if stills:
        print(f"{len(stills)} still frame(s) without a next frame ({', '.join(stills[:3])}{', ...' if len(stills) > 3 else ''}): no flow and no K_f drawn")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = draw_frames(module, frames, out, args.pixel, settings["max_magnitude"], args.seed)
    print(f"{len(written)} frame pictures of {len(frames)} frames (short side {size}) written to {out}")
    if args.neurons:
        path, random, trained = draw_stimuli(module, out, args.neurons, args.steps, args.stimulus_size, args.seed)
        print(f"{path}: conv5 stimuli, mean target activation {random.initial.mean():.2f} -> {random.final.mean():.2f} "
              f"(random initialisation), {trained.initial.mean():.2f} -> {trained.final.mean():.2f} (trained)")
    return 0
