"""PASCAL VOC files in the standard VOCdevkit layout: annotations, image sets, masks.

Layout read here (as in the official archives)::

    ROOT/VOCdevkit/VOC2007/{JPEGImages/*.jpg, Annotations/*.xml, ImageSets/Main/<split>.txt}
    ROOT/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass/*.png, ImageSets/Segmentation/<split>.txt}
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from crossflow.errors import InvalidInputError, MissingInputError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOID_LABEL = 255
DOWNLOAD_HINT = (
    "get the official archives from the PASCAL VOC site (VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar, "
    "VOCtrainval_11-May-2012.tar) and extract them into the same folder, or run the demo on the synthetic world "
    "with `crossflow synth voc --out data/demo/voc` (make ... DEMO=1)"
)


@dataclass
class VOCObject:
    name: str
    label: int  # index into VOC_CLASSES
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in VOC's 1-based pixel coordinates
    difficult: bool
    truncated: bool


@dataclass
class VOCAnnotation:
    image_id: str
    filename: str
    width: int
    height: int
    objects: list[VOCObject] = field(default_factory=list)


def year_dir(root: str | Path, year: str) -> Path:
    """``ROOT/VOCdevkit/VOC<year>``, accepting ROOT itself being VOCdevkit or VOC<year>; a clear error if absent."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root):
        if (candidate / "JPEGImages").is_dir() and candidate.name == f"VOC{year}":
            return candidate
    raise MissingInputError(
        f"PASCAL VOC{year} not found under {root}: expected {root}/VOCdevkit/VOC{year}/JPEGImages; {DOWNLOAD_HINT}"
    )


def read_image_set(voc_dir: Path, split: str, task: str = "Main") -> list[str]:
    """Image ids listed in ``ImageSets/<task>/<split>.txt``."""
    path = Path(voc_dir) / "ImageSets" / task / f"{split}.txt"
    if not path.is_file():
        raise MissingInputError(f"VOC image set not found: {path} (expected the standard VOCdevkit layout)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def parse_annotation(path: str | Path) -> VOCAnnotation:
    """One VOC XML file -> :class:`VOCAnnotation`; unknown class names are an error."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    annotation = VOCAnnotation(
        image_id=Path(path).stem,
        filename=root.findtext("filename", f"{Path(path).stem}.jpg"),
        width=int(size.findtext("width")),
        height=int(size.findtext("height")),
    )
    for obj in root.iter("object"):
        name = obj.findtext("name").strip()
        if name not in VOC_CLASSES:
            raise InvalidInputError(f"{path}: unknown VOC class {name!r}")
        box = obj.find("bndbox")
        annotation.objects.append(
            VOCObject(
                name=name,
                label=VOC_CLASSES.index(name),
                box=tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")),
                difficult=obj.findtext("difficult", "0").strip() == "1",
                truncated=obj.findtext("truncated", "0").strip() == "1",
            )
        )
    return annotation


def classification_labels(annotation: VOCAnnotation) -> np.ndarray:
    """VOC's per-class image labels ``[20]`` int8: 1 present, 0 only difficult instances, -1 absent."""
    labels = np.full(len(VOC_CLASSES), -1, dtype=np.int8)
    for obj in annotation.objects:
        if obj.difficult:
            labels[obj.label] = max(labels[obj.label], 0)
        else:
            labels[obj.label] = 1
    return labels


def read_segmentation_mask(path: str | Path) -> np.ndarray:
    """A VOC palette PNG -> class indices ``[H, W]`` uint8 (0 background, 1..20, 255 void).

    Read with PIL: the indices are the palette positions (OpenCV would return colours).
    """
    with Image.open(path) as image:
        if image.mode != "P":
            raise InvalidInputError(f"{path}: not a VOC palette PNG (mode {image.mode}, expected 'P')")
        return np.array(image, dtype=np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file -> ``[H, W, 3]`` uint8 RGB."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
