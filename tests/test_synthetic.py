"""The synthetic world: determinism, exact ground-truth flow, and the written layouts."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crossflow.data.render import CLASSES, Scene, SceneObject, affine, ground_truth_flow, make_sprite, render_clip, render_frame
from crossflow.cli import main as crossflow
from crossflow.data.synthetic import PALETTE, main
from crossflow.flow import read_flow
from crossflow.summary import training_world

from .conftest import SHARED_DATA

REAL_VOC = SHARED_DATA / "voc" / "VOCdevkit"


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def away_from_edges(instances: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels farther than ``radius`` from any label change (and from the image border)."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    interior = cv2.dilate(instances, kernel) == cv2.erode(instances, kernel)
    interior[:radius], interior[-radius:], interior[:, :radius], interior[:, -radius:] = False, False, False, False
    return interior


def test_render_clip_is_deterministic():
    a, b, c = render_clip(11, num_frames=8), render_clip(11, num_frames=8), render_clip(12, num_frames=8)
    assert a.frames.shape == (8, 144, 192, 3) and a.frames.dtype == np.uint8
    assert a.instances.shape == (8, 144, 192) and a.instances.max() == len(a.classes)
    assert a.frames.tobytes() == b.frames.tobytes() and a.instances.tobytes() == b.instances.tobytes()
    assert a.surfaces.tobytes() == b.surfaces.tobytes() and a.classes == b.classes
    assert a.frames.tobytes() != c.frames.tobytes()
    assert all(0 <= label < len(CLASSES) for label in a.classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_object_world_moves_one_object_over_a_still_background(seed):
    clip = render_clip(seed, num_frames=12, world="one-object")
    assert len(clip.classes) == 1 and clip.static == [False]
    for t in (0, 6):
        flow, valid = clip.flow(t)
        background, on_object = (clip.instances[t] == 0) & valid, (clip.instances[t] == 1) & valid
        assert np.abs(flow[background]).max() < 1e-6 and on_object.any()
        assert np.abs(flow[on_object]).mean() > 0  # the object moves, the camera and canvas do not
    # The default world is unchanged by the option: same clip for the same seed.
    assert render_clip(seed, num_frames=12).frames.tobytes() == render_clip(seed, num_frames=12, world="default").frames.tobytes()


def test_unknown_world_is_refused():
    with pytest.raises(ValueError, match="one-object"):
        render_clip(0, num_frames=8, world="two-objects")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ground_truth_flow_warps_frame_back(seed):
    """remap(frame[t+gap], p + flow(p)) == frame[t] on valid pixels away from object borders."""
    clip = render_clip(seed)
    height, width = clip.frames.shape[1:3]
    y, x = np.mgrid[:height, :width].astype(np.float32)
    for t in (0, 12):
        flow, valid = clip.flow(t)
        assert flow.shape == (height, width, 2) and flow.dtype == np.float32 and valid.mean() > 0.5
        warped = cv2.remap(clip.frames[t + 5], x + flow[..., 0], y + flow[..., 1], cv2.INTER_LINEAR)
        mask = valid & away_from_edges(clip.instances[t]) & away_from_edges(clip.instances[t + 5])
        error = np.abs(warped.astype(np.float32) - clip.frames[t]).mean(axis=-1)[mask]
        still = np.abs(clip.frames[t + 5].astype(np.float32) - clip.frames[t]).mean(axis=-1)[mask]
        assert mask.sum() > 0.3 * mask.size
        assert error.mean() < 3.0, f"seed {seed} t {t}: mean abs error {error.mean():.2f}"
        assert error.mean() < 0.5 * still.mean() or np.abs(flow[mask]).max() < 0.5


def test_flow_of_a_translating_object_is_exact():
    """Still camera, one sprite moving 2 px/frame right: flow is (2 gap, 0) on it, 0 elsewhere,
    and background pixels it covers at t+gap are invalid (occluded)."""
    rng = np.random.default_rng(0)
    frames, gap = 6, 3
    sprite = make_sprite(rng, CLASSES.index("tvmonitor"), 24, False)
    motion = affine(np.stack([20 + 2.0 * np.arange(frames), np.full(frames, 24.0)], axis=1), 0, 1, 1, (11.5, 11.5))
    canvas = rng.uniform(0, 255, (48, 96, 3)).astype(np.float32)
    camera = affine((0, 0), np.zeros(frames), 1, 1, (0, 0))
    scene = Scene(canvas, camera, [SceneObject(19, sprite, motion, False, "Unspecified")], (96, 48))
    instances = np.stack([render_frame(scene, t)[1] for t in range(frames)])
    flow, valid = ground_truth_flow(scene.surfaces(), instances, 0, gap)
    on_object = instances[0] == 1
    np.testing.assert_allclose(flow[on_object] - [2.0 * gap, 0.0], 0.0, atol=1e-4)
    np.testing.assert_allclose(flow[~on_object], 0.0, atol=1e-4)
    covered_later = ~on_object & (instances[gap] == 1)
    assert covered_later.any() and not valid[covered_later].any()
    assert valid[on_object & away_from_edges(instances[0])].all()


def run_synth(*argv) -> int:
    return main([str(a) for a in argv])


def test_videos_layout_decode_and_ground_truth(tmp_path, capsys):
    out = tmp_path / "videos"
    settings = ("--num-videos", 2, "--frames", 8, "--width", 64, "--height", 48, "--gap", 3, "--seed", 5, "--workers", 2)
    assert run_synth("videos", "--out", out, *settings) == 0
    videos = sorted((out / "videos").iterdir())
    assert [v.name for v in videos] == ["clip_0000.mp4", "clip_0001.mp4"]
    assert not list((out / "groundtruth").rglob("*.mp4"))
    for video in videos:
        meta = json.loads((out / "groundtruth" / video.stem / "clip.json").read_text())
        clip = render_clip(meta["render_seed"], meta["num_frames"], (meta["width"], meta["height"]), meta["gap"])
        capture = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
        decoded = []
        while (frame := capture.read())[0]:
            decoded.append(frame[1][..., ::-1])
        capture.release()
        assert len(decoded) == 8 and decoded[0].shape == (48, 64, 3)
        assert np.abs(np.stack(decoded).astype(np.float32) - clip.frames).mean() < 12  # lossy codec
        truth = out / "groundtruth" / video.stem
        assert sorted(p.name for p in truth.glob("flow_*.png")) == [f"flow_{t:04d}.png" for t in range(5)]
        assert [i["class_index"] for i in meta["instances"]] == clip.classes
        for t in range(8):
            instances = cv2.imread(str(truth / f"instances_{t:04d}.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(instances, clip.instances[t])
        flow, valid = read_flow(truth / "flow_0002.png")
        expected, expected_valid = clip.flow(2)
        np.testing.assert_allclose(flow, expected, atol=1 / 64)
        np.testing.assert_array_equal(valid, expected_valid)


def test_rerun_is_a_noop_and_other_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "videos"
    args = ("videos", "--out", out, "--num-videos", 1, "--frames", 6, "--width", 64, "--height", 48, "--gap", 2)
    assert run_synth(*args) == 0
    before = tree_digest(out)
    assert run_synth(*args) == 0
    assert "already exists" in capsys.readouterr().out
    assert tree_digest(out) == before
    assert run_synth(*args[:-1], 3) == 1
    assert "other settings" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


SMALL = {"voc": ("--num-images", 6), "videos": ("--num-videos", 2, "--frames", 7, "--width", 64, "--height", 48)}


@pytest.mark.parametrize("kind, size", SMALL.items())
def test_same_seed_same_files_whatever_the_workers(tmp_path, kind, size):
    for workers in (1, 2):
        assert run_synth(kind, "--out", tmp_path / f"w{workers}", *size, "--seed", 3, "--workers", workers) == 0
    assert tree_digest(tmp_path / "w1") == tree_digest(tmp_path / "w2")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "voc"
    assert run_synth("voc", "--out", out, "--num-images", 16, "--seed", 1) == 0
    return out / "VOCdevkit"


def parse_objects(path: Path) -> tuple[ET.Element, list[dict]]:
    root = ET.parse(path).getroot()
    objects = [{"name": o.findtext("name"), "difficult": int(o.findtext("difficult")), "truncated": int(o.findtext("truncated")),
                "box": [int(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")], "pose": o.findtext("pose")}
               for o in root.iter("object")]
    return root, objects


@pytest.mark.parametrize("year, splits", [("2007", ("train", "val", "trainval", "test")), ("2012", ("train", "val", "trainval"))])
def test_voc_layout(voc_root, year, splits):
    base = voc_root / f"VOC{year}"
    ids = sorted(p.stem for p in (base / "JPEGImages").glob("*.jpg"))
    assert len(ids) == 16
    sets = {s: (base / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in splits}
    assert set(sets["trainval"]) == set(sets["train"]) | set(sets["val"]) and not set(sets["train"]) & set(sets["val"])
    assert sorted(sets["trainval"] + sets.get("test", [])) == ids
    for split in ("train", "val", "trainval"):
        assert (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split() == sets[split]
    labels = {}
    for image_id in ids:
        root, objects = parse_objects(base / "Annotations" / f"{image_id}.xml")
        assert root.findtext("folder") == f"VOC{year}" and root.findtext("filename") == f"{image_id}.jpg"
        width, height, depth = (int(root.find("size").findtext(k)) for k in ("width", "height", "depth"))
        assert Image.open(base / "JPEGImages" / f"{image_id}.jpg").size == (width, height) and depth == 3
        assert 160 <= width <= 256 and 160 <= height <= 256 and objects
        for obj in objects:
            xmin, ymin, xmax, ymax = obj["box"]
            assert obj["name"] in CLASSES and obj["pose"] in ("Left", "Right", "Unspecified")
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
        for kind in ("SegmentationClass", "SegmentationObject"):
            with Image.open(base / kind / f"{image_id}.png") as mask:
                assert mask.mode == "P" and mask.size == (width, height) and mask.getpalette()[:768] == PALETTE
                values = set(np.unique(np.array(mask)).tolist())
            assert values <= set(range(21)) | {255} and 255 in values
        classes = np.array(Image.open(base / "SegmentationClass" / f"{image_id}.png"))
        present = {CLASSES.index(o["name"]) + 1 for o in objects if not o["difficult"]}
        assert set(np.unique(classes).tolist()) - {0, 255} <= present
        labels[image_id] = {name: max([1 - o["difficult"] for o in objects if o["name"] == name], default=-1) for name in CLASSES}
    for split in splits:
        for name in CLASSES:
            lines = (base / "ImageSets" / "Main" / f"{name}_{split}.txt").read_text().splitlines()
            assert [line.split()[0] for line in lines] == sets[split]
            assert all(int(line.split()[1]) == labels[line.split()[0]][name] for line in lines)
            assert all(line == f"{line.split()[0]} {int(line.split()[1]):2d}" for line in lines)


@pytest.mark.skipif(not REAL_VOC.is_dir(), reason="real VOC samples (../shared/data/voc) not present")
def test_voc_files_match_the_real_formats(voc_root):
    """Every element of the real XML exists in ours (bar flickr metadata), and the palettes agree."""
    real = ET.parse(REAL_VOC / "VOC2007" / "Annotations" / "000001.xml").getroot()
    ours = ET.parse(next((voc_root / "VOC2007" / "Annotations").glob("*.xml"))).getroot()

    def paths(node, prefix=""):
        return {prefix + child.tag for child in node} | {p for child in node for p in paths(child, prefix + child.tag + "/")}

    skipped = {"owner", "source/flickrid"}
    assert {p for p in paths(real) if not any(p.startswith(s) for s in skipped)} <= paths(ours)
    with Image.open(REAL_VOC / "VOC2012" / "SegmentationClass" / "2007_000033.png") as mask:
        assert mask.getpalette()[:768] == PALETTE


def test_imagenet_layout_loads_with_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "imagenet"
    assert run_synth("imagenet", "--out", out, "--images-per-class", 2, "--val-per-class", 1, "--seed", 4) == 0
    train, val = ImageFolder(str(out / "train")), ImageFolder(str(out / "val"))
    assert train.classes == list(CLASSES) and val.classes == list(CLASSES)
    assert len(train) == 40 and len(val) == 20
    image, label = train[5]
    assert label == 2 and 128 <= min(image.size) and max(image.size) <= 176


def test_summary_scores_grouping_on_the_world_the_pairs_were_prepared_from(tmp_path):
    videos, pairs = tmp_path / "videos", tmp_path / "pairs"
    assert crossflow(["synth", "videos", "--out", str(videos), "--num-videos", "2", "--frames", "8", "--width", "64",
                      "--height", "48", "--gap", "2", "--world", "one-object", "--workers", "1"]) == 0
    assert json.loads((videos / "synth.json").read_text())["world"] == "one-object"
    assert crossflow(["prepare", str(videos), "--out", str(pairs), "--frames-per-video", "2", "--gap", "2",
                      "--short-side", "48", "--val-fraction", "0.5", "--workers", "1"]) == 0
    assert training_world(pairs) == "one-object"
    assert training_world(tmp_path / "not-prepared") == "default"


def test_a_videos_folder_of_the_first_faster_world_is_refused_with_what_to_do(tmp_path, capsys):
    out = tmp_path / "videos"
    args = ["synth", "videos", "--out", str(out), "--num-videos", "1", "--frames", "4", "--width", "32", "--height", "32", "--gap", "1", "--workers", "1"]
    assert crossflow(args) == 0
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["format_version"] == 2
    (out / "synth.json").write_text(json.dumps({**manifest, "format_version": 1}))  # what crossflow wrote before 2026-12-04
    capsys.readouterr()
    assert crossflow(args) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "other settings" in error and "remove it" in error
