"""``crossflow synth``: the synthetic world written as real files (videos, VOC, ImageFolder).

Three outputs, each generated into a temporary sibling folder and renamed into place when
complete (``DIR/synth.json`` records the settings; rerunning with the same settings is a no-op):

``synth videos --out DIR``::

    DIR/videos/clip_0000.mp4 ...            MPEG-4 Part 2 ('mp4v'), RGB frames, only videos here
    DIR/groundtruth/clip_0000/clip.json     render seed, size, fps, gap, instances [{id, class, class_index, static}]
    DIR/groundtruth/clip_0000/instances_0000.png ...  uint8, per frame: 0 background, k = object k (k hides < k)
    DIR/groundtruth/clip_0000/flow_0000.png ...       KITTI 16-bit flow frame t -> t+gap, t = 0..T-gap-1

    Flow is exact on the *rendered* frames (the video is lossy: ~4 grey levels mean error);
    ``render_clip(clip.json's render_seed, num_frames, (width, height), gap, world)`` re-renders them.
    Flow values are exact at every pixel; valid = the surface point is inside the frame and
    not occluded at t+gap (so invalid pixels are occluded or out of view).

``synth voc --out DIR``: ``DIR/VOCdevkit/VOC2007`` (ids 000001.., splits train/val/test) and
``DIR/VOCdevkit/VOC2012`` (ids 2012_000001.., splits train/val), N images each, in the official
layout: JPEGImages, Annotations (VOC XML, 1-based boxes of the visible pixels), SegmentationClass
and SegmentationObject (palette PNGs; void 255 in a 4 px band along object borders and over
difficult objects), ImageSets/Main (``<split>.txt``, ``<class>_<split>.txt`` with 1 / -1 / 0 =
only difficult) and ImageSets/Segmentation (all images are segmented).

``synth imagenet --out DIR``: ``DIR/{train,val}/<class name>/<class name>_00000.JPEG``, one
centred object per image; folder names are the VOC class names, so ImageFolder's sorted class
indices equal the VOC class indices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from crossflow.data.render import CLASSES, WORLDS, render_clip, render_frame, sample_still_scene
from crossflow.errors import UserInputError
from crossflow.flow import write_flow

# per kind; videos 2: the default world's slower camera and objects, more of them (render.sample_clip_scene),
# so a folder of the first world's clips is refused rather than mixed with new ones
FORMAT_VERSIONS = {"videos": 2, "voc": 1, "imagenet": 1}
FOURCC, VIDEO_SUFFIX = "mp4v", ".mp4"
MANIFEST = "synth.json"
JPEG_QUALITY = 90
VOID = 255
VOC_FOLDERS = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Main", "ImageSets/Segmentation")
VOC_SPLITS = {"2007": ("train", "val", "trainval", "test"), "2012": ("train", "val", "trainval")}


class SynthError(UserInputError):
    """A user-facing error of ``crossflow synth`` (printed on one line)."""


def item_seed(*keys: int) -> int:
    """A 32-bit seed for one generated item, from (global seed, item keys) via SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (768 values): bit-interleaved colours, 255 = (224, 224, 192)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r, g, b = r | ((c & 1) << shift), g | (((c >> 1) & 1) << shift), b | (((c >> 2) & 1) << shift)
            c >>= 3
        palette += [r, g, b]
    return palette


PALETTE = voc_palette()


def parallel(function, jobs: list[tuple], workers: int) -> list:
    """``[function(*job) for job in jobs]`` over ``workers`` processes (order kept; results do not
    depend on ``workers`` since every item has its own seed)."""
    if workers <= 1 or len(jobs) < 2:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        return list(pool.map(function, *zip(*jobs), chunksize=max(1, len(jobs) // (8 * workers))))


# ---------------------------------------------------------------------------------------------
# videos


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """RGB frames ``[T, H, W, 3]`` uint8 -> an MPEG-4 video OpenCV's FFMPEG backend reads back."""
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*FOURCC), fps, (width, height))
    if not writer.isOpened():
        raise SynthError(f"OpenCV cannot write {FOURCC!r} video to {path} (is its FFMPEG backend available?)")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()


def write_clip(root: Path, index: int, seed: int, num_frames: int, size: tuple, gap: int, fps: float, world: str) -> None:
    """Clip ``index``: its video under ``root/videos`` and its ground truth under ``root/groundtruth``."""
    name, render_seed = f"clip_{index:04d}", item_seed(seed, 0, index)
    clip = render_clip(render_seed, num_frames, size, gap, world)
    write_video(root / "videos" / f"{name}{VIDEO_SUFFIX}", clip.frames, fps)
    truth = root / "groundtruth" / name
    truth.mkdir(parents=True)
    for t, instances in enumerate(clip.instances):
        cv2.imwrite(str(truth / f"instances_{t:04d}.png"), instances)
    for t in range(num_frames - gap):
        write_flow(truth / f"flow_{t:04d}.png", *clip.flow(t))
    meta = {
        "video": f"videos/{name}{VIDEO_SUFFIX}", "render_seed": render_seed, "num_frames": num_frames,
        "width": size[0], "height": size[1], "fps": fps, "gap": gap, "world": world,
        "flow": "flow_%04d.png: KITTI 16-bit, frame t -> t+gap on the rendered frames; valid = visible at t+gap",
        "instances": [{"id": k, "class": CLASSES[label], "class_index": label, "static": static}
                      for k, (label, static) in enumerate(zip(clip.classes, clip.static), start=1)],
    }
    (truth / "clip.json").write_text(json.dumps(meta, indent=1))


def write_videos(root: Path, args) -> str:
    """``args.num_videos`` clips; returns a summary."""
    (root / "videos").mkdir(parents=True)
    size = (args.width, args.height)
    jobs = [(root, index, args.seed, args.frames, size, args.gap, args.fps, args.world) for index in range(args.num_videos)]
    parallel(write_clip, jobs, args.workers)
    return f"{args.num_videos} videos of {args.frames} frames {args.width}x{args.height} ({args.world} world)"


# ---------------------------------------------------------------------------------------------
# VOC


def annotate_still(rng, size) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A VOC-like still -> (RGB ``[H, W, 3]``, instances ``[H, W]`` (object k = k), objects).

    Objects with fewer than 40 visible px are dropped; ``truncated``: the unoccluded silhouette
    leaves the image; ``difficult``: under 150 visible px or under 30 % of it visible.
    """
    while True:
        count = rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1])
        scene = sample_still_scene(rng, size, rng.integers(len(CLASSES), size=count))
        image, instances = render_frame(scene, 0)
        visible = np.bincount(instances.ravel(), minlength=count + 1)[1:]
        scene.objects = [obj for obj, area in zip(scene.objects, visible) if area >= 40]
        if scene.objects:
            break
    if len(scene.objects) < count:
        image, instances = render_frame(scene, 0)
    objects = []
    for k, obj in enumerate(scene.objects, start=1):
        full_area, truncated = silhouette(obj.sprite, scene.camera[0] @ obj.motion[0], size)
        ys, xs = np.nonzero(instances == k)
        objects.append({
            "name": CLASSES[obj.label], "label": obj.label, "pose": obj.pose, "truncated": int(truncated),
            "difficult": int(len(xs) < 150 or len(xs) < 0.3 * full_area),
            "bndbox": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),
        })
    return image, instances, objects


def silhouette(sprite: np.ndarray, transform: np.ndarray, size) -> tuple[float, bool]:
    """A sprite's unoccluded silhouette under ``transform`` (sprite -> image): (area px, leaves the image)."""
    ys, xs = np.nonzero(sprite[..., 3] > 0.5)
    points = transform[:2, :2] @ np.stack([xs, ys]) + transform[:2, 2:]
    limit = np.array(size, np.float64)[:, None] - 0.5
    outside = bool(((points < -0.5) | (points > limit)).any())
    return len(xs) * abs(np.linalg.det(transform[:2, :2])), outside


def segmentation_maps(instances: np.ndarray, objects: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(class map, object map) ``[H, W]`` uint8: 0 background, class+1 / object index, 255 void
    on a 4 px band along every border between labels and over difficult objects."""
    kernel = np.ones((5, 5), np.uint8)
    border = cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)
    lookup = np.array([0] + [VOID if o["difficult"] else o["label"] + 1 for o in objects], np.uint8)
    classes = lookup[instances]
    objects_map = np.where(classes == VOID, VOID, instances).astype(np.uint8)
    classes[border], objects_map[border] = VOID, VOID
    return classes, objects_map


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    """Label map -> PNG in PIL mode 'P' with the VOC palette."""
    image = Image.fromarray(labels)
    image.putpalette(PALETTE)
    image.save(path)


def voc_xml(year: str, image_id: str, size, objects: list[dict]) -> str:
    """The VOC annotation XML (tab-indented like the official files)."""
    root = ET.Element("annotation")

    def add(parent, tag, text=None):
        node = ET.SubElement(parent, tag)
        node.text = None if text is None else str(text)
        return node

    add(root, "folder", f"VOC{year}")
    add(root, "filename", f"{image_id}.jpg")
    source = add(root, "source")
    add(source, "database", f"The VOC{year} Database")
    add(source, "annotation", f"PASCAL VOC{year}")
    add(source, "image", "crossflow synthetic")
    size_node = add(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        add(size_node, tag, value)
    add(root, "segmented", 1)
    for obj in objects:
        node = add(root, "object")
        for tag in ("name", "pose", "truncated", "difficult"):
            add(node, tag, obj[tag])
        box = add(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["bndbox"]):
            add(box, tag, value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def write_voc_image(base: Path, year: str, image_id: str, seed: int) -> list[dict]:
    """One image with its XML and masks under ``base`` (= VOCdevkit/VOC<year>); returns its objects."""
    rng = np.random.default_rng(seed)
    size = tuple(int(v) for v in rng.integers(160, 257, size=2))
    image, instances, objects = annotate_still(rng, size)
    cv2.imwrite(str(base / "JPEGImages" / f"{image_id}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(year, image_id, size, objects))
    class_map, object_map = segmentation_maps(instances, objects)
    write_palette_png(base / "SegmentationClass" / f"{image_id}.png", class_map)
    write_palette_png(base / "SegmentationObject" / f"{image_id}.png", object_map)
    return objects


def voc_splits(year: str, ids: list[str], seed: int) -> dict[str, list[str]]:
    """Random halves: VOC2007 trainval/test, then train/val within trainval; VOC2012 train/val."""
    order = [ids[i] for i in np.random.default_rng(item_seed(seed, int(year), 1 << 30)).permutation(len(ids))]
    held_out = order[: len(ids) // 2] if year == "2007" else []
    trainval = order[len(held_out):]
    splits = {"train": trainval[: len(trainval) // 2], "val": trainval[len(trainval) // 2:], "trainval": trainval}
    if year == "2007":
        splits["test"] = held_out
    return {name: sorted(members) for name, members in splits.items()}


def image_label(objects: list[dict], label: int) -> int:
    """VOC per-class image label: 1 a non-difficult instance, 0 only difficult ones, -1 none."""
    flags = [o["difficult"] for o in objects if o["label"] == label]
    return -1 if not flags else (0 if all(flags) else 1)


def write_image_sets(base: Path, splits: dict[str, list[str]], objects: dict[str, list[dict]]) -> None:
    """ImageSets/Main (split lists and per-class ``<id> <label>`` lists) and ImageSets/Segmentation."""
    for split, ids in splits.items():
        listing = "".join(f"{image_id}\n" for image_id in ids)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(listing)
        for label, name in enumerate(CLASSES):
            lines = "".join(f"{image_id} {image_label(objects[image_id], label):2d}\n" for image_id in ids)
            (base / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(lines)


def write_voc(root: Path, args) -> str:
    """VOC2007 and VOC2012, ``args.num_images`` images each; returns a summary."""
    for year in VOC_SPLITS:
        base = root / "VOCdevkit" / f"VOC{year}"
        for folder in VOC_FOLDERS:
            (base / folder).mkdir(parents=True)
        ids = [f"{i:06d}" if year == "2007" else f"{year}_{i:06d}" for i in range(1, args.num_images + 1)]
        jobs = [(base, year, image_id, item_seed(args.seed, int(year), i)) for i, image_id in enumerate(ids)]
        objects = dict(zip(ids, parallel(write_voc_image, jobs, args.workers)))
        write_image_sets(base, voc_splits(year, ids, args.seed), objects)
    return f"VOC2007 and VOC2012 with {args.num_images} images each"


# ---------------------------------------------------------------------------------------------
# ImageNet-style ImageFolder


def write_imagenet_image(path: Path, label: int, seed: int) -> None:
    """One JPEG of one centred object of class ``label`` on its own background, 128-176 px sides."""
    rng = np.random.default_rng(seed)
    size = tuple(int(v) for v in rng.integers(128, 177, size=2))
    image = render_frame(sample_still_scene(rng, size, [label], centred=True), 0)[0]
    cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])


def write_imagenet(root: Path, args) -> str:
    """``root/{train,val}/<class>/<class>_00000.JPEG``; returns a summary."""
    jobs = []
    for split_index, (split, count) in enumerate((("train", args.images_per_class), ("val", args.val_per_class))):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            jobs += [(root / split / name / f"{name}_{i:05d}.JPEG", label, item_seed(args.seed, 3, split_index, label, i))
                     for i in range(count)]
    parallel(write_imagenet_image, jobs, args.workers)
    return f"{len(CLASSES)} classes, {args.images_per_class} train + {args.val_per_class} val images each"


# ---------------------------------------------------------------------------------------------
# output folders and the command line

WRITERS = {"videos": write_videos, "voc": write_voc, "imagenet": write_imagenet}
SETTINGS = {
    "videos": ("seed", "num_videos", "frames", "width", "height", "gap", "fps", "world"),
    "voc": ("seed", "num_images"),
    "imagenet": ("seed", "images_per_class", "val_per_class"),
}


def manifest(args) -> dict:
    """What ``DIR/synth.json`` records: the kind, format version and every setting."""
    return {"kind": args.kind, "format_version": FORMAT_VERSIONS[args.kind], **{k: getattr(args, k) for k in SETTINGS[args.kind]}}


def is_complete(out: Path, expected: dict) -> bool:
    """True if ``out`` holds a finished output with these settings; an error if it holds something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    path = out / MANIFEST
    if not path.is_file():
        raise SynthError(f"{out} exists and is not a crossflow synth output; remove it or choose another --out")
    found = json.loads(path.read_text())
    if found != expected:
        raise SynthError(f"{out} holds a synth output with other settings ({found}); remove it or choose another --out")
    return True


def generate(out: Path, args) -> str:
    """Write into a temporary sibling folder, then rename it to ``out`` (atomic publish)."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        summary = WRITERS[args.kind](partial, args)
        (partial / MANIFEST).write_text(json.dumps(manifest(args), indent=1) + "\n")
        if out.is_dir():
            out.rmdir()  # only an empty folder gets here (see is_complete)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def validate(args) -> None:
    """One-line errors for settings the writers cannot honour."""
    for name in ("num_videos", "num_images", "images_per_class", "val_per_class", "frames", "gap", "workers"):
        value = getattr(args, name, 1)
        if value < 1:
            raise SynthError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if args.kind == "videos":
        if args.frames <= args.gap:
            raise SynthError(f"--frames ({args.frames}) must exceed --gap ({args.gap}) to give any flow pair")
        if args.width < 32 or args.height < 32 or args.width % 2 or args.height % 2:
            raise SynthError(f"--width and --height must be even and at least 32 (got {args.width}x{args.height})")


def run(args) -> int:
    """Generate the output ``args.kind`` into ``args.out``; 0 on success (or when it already exists), 1 on error."""
    out = Path(args.out)
    try:
        validate(args)
        if is_complete(out, manifest(args)):
            print(f"{out}: already exists with these settings; nothing to do")
            return 0
        start = time.perf_counter()
        summary = generate(out, args)
    except (SynthError, OSError) as error:
        print(f"crossflow synth {args.kind}: error: {error}", file=sys.stderr)
        return 1
    print(f"{out}: wrote {summary} in {time.perf_counter() - start:.1f} s")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``videos``, ``voc`` and ``imagenet`` subcommands (dest ``kind``) to ``parser``."""
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{videos,voc,imagenet}")
    videos = kinds.add_parser("videos", help="clips of moving objects with exact flow and instance masks")
    videos.add_argument("--num-videos", type=int, default=48)
    videos.add_argument("--frames", type=int, default=24, help="frames per clip")
    videos.add_argument("--width", type=int, default=192)
    videos.add_argument("--height", type=int, default=144)
    videos.add_argument("--gap", type=int, default=5, help="ground-truth flow is frame t -> t+gap")
    videos.add_argument("--fps", type=float, default=25.0)
    videos.add_argument("--world", choices=WORLDS, default="default",
                        help="default: 2-5 objects, camera moving half the time; one-object: one moving object, still camera and background")
    voc = kinds.add_parser("voc", help="labelled stills in the VOCdevkit VOC2007 + VOC2012 layouts")
    voc.add_argument("--num-images", type=int, default=300, help="images per year")
    imagenet = kinds.add_parser("imagenet", help="one-object images in an ImageFolder train/val layout")
    imagenet.add_argument("--images-per-class", type=int, default=100, help="train images per class")
    imagenet.add_argument("--val-per-class", type=int, default=20)
    for sub in (videos, voc, imagenet):
        sub.add_argument("--out", required=True, help="output folder (created atomically)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                         help="processes (default: CPU count, at most 8; the output does not depend on it)")


def main(argv=None) -> int:
    """``python -m crossflow.data.synthetic {videos,voc,imagenet} ...``."""
    description = "Write the synthetic world: videos with ground truth, VOC and ImageFolder stills."
    parser = argparse.ArgumentParser(prog="crossflow synth", description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
