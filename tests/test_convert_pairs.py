"""Flow formats end to end: `crossflow prepare --flow-format`, the loader on each, and `crossflow convert-pairs`
(exact where lossless, resumable, one-line errors); on the tiny synthetic clips of conftest."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from crossflow.cli import main as crossflow
from crossflow.data.pairs import Augmentation, PairShards
from crossflow.flow import FLOW_FORMATS, FLOW_MEMBERS, decode_flow_member, normalize_flow, u8_error_bound

PREPARE = ["--frames-per-video", "3", "--gap", "2", "--short-side", "72", "--val-fraction", "0.3", "--workers", "1",
           "--seed", "0", "--shard-size", "6"]  # fmt: skip  (2 videos a shard: several shards per split)
M = 56.0  # eq. 6's M, the loader's default
MAX_SCALE = 1.5  # the augmentation's largest vector scale below
PNG_STEP = 1 / 64  # KITTI PNG resolution in pixels


@pytest.fixture(scope="module")
def prepared(tiny_videos, tmp_path_factory) -> dict[str, Path]:
    """{flow format: the tiny clips through the real `crossflow prepare --flow-format`}."""
    folders = {}
    for flow_format in FLOW_FORMATS:
        folders[flow_format] = tmp_path_factory.mktemp(f"pairs-{flow_format}")
        assert crossflow(["prepare", str(tiny_videos), "--out", str(folders[flow_format]), *PREPARE, "--flow-format", flow_format]) == 0
    return folders


def shard_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{shard path/key: {member suffix: bytes}} of every shard of ``folder``, read with tarfile."""
    samples = {}
    for shard in sorted(folder.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, suffix = member.name.split(".", 1)
                samples.setdefault(f"{shard.relative_to(folder)}/{key}", {})[suffix] = tar.extractfile(member).read()
    return samples


def outputs(folder: Path) -> dict[str, bytes]:
    """What training and resume read: shards, members caches, records, index and skip list."""
    files = [*folder.glob("*/shard-*.tar"), *folder.glob("*/shard-*.tar.members.json"), *folder.glob("records/*.json"),
             folder / "index.json", folder / "skipped.jsonl"]  # fmt: skip
    return {str(p.relative_to(folder)): p.read_bytes() for p in files if p.exists()}


def tar_outputs(folder: Path) -> dict[str, bytes]:
    """The shards, records, index and skip list (members caches hold mtimes, so differ between copies)."""
    return {name: data for name, data in outputs(folder).items() if not name.endswith(".members.json")}


def flow_of(sample: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    (name,) = [name for name in FLOW_MEMBERS if name in sample]
    flow, valid = decode_flow_member(name, sample[name])
    return np.ascontiguousarray(flow), valid


def test_prepare_writes_the_chosen_member_and_names_it_in_meta_settings_and_index(prepared, tiny_pairs):
    frames = {}
    for flow_format, folder in prepared.items():
        samples = shard_samples(folder)
        assert len(samples) == 18
        for path, sample in samples.items():
            assert set(sample) == {"frame.jpg", FLOW_FORMATS[flow_format], "meta.json"}
            assert json.loads(sample["meta.json"])["flow_format"] == flow_format
        frames[flow_format] = {path: sample["frame.jpg"] for path, sample in samples.items()}
        for name in ("settings.json", "index.json"):
            assert json.loads((folder / name).read_text())["settings"]["flow_format"] == flow_format
    assert frames["kitti-png"] == frames["i16-zstd"] == frames["u8-lz4"]  # the same samples, keys and frames
    default = shard_samples(tiny_pairs)  # conftest's prepare names no --flow-format
    assert {json.loads(sample["meta.json"])["flow_format"] for sample in default.values()} == {"u8-lz4"}
    assert all("flow.u8.lz4" in sample for sample in default.values())


def test_stored_flow_agrees_between_formats(prepared):
    png, i16, u8 = (shard_samples(prepared[f]) for f in ("kitti-png", "i16-zstd", "u8-lz4"))
    for path in png:
        (flow, valid), (lossless, lossless_valid), (lossy, lossy_valid) = (flow_of(s[path]) for s in (png, i16, u8))
        assert valid.all() and lossless_valid.all() and lossy_valid.all()
        assert np.array_equal(lossless, flow)  # the same 1/64 px values
        # u8: half a level of g = sign(f) log(1 + |f|) (u8_error_bound at vector scale 1), against the PNG's own
        # rounding to 1/64 px, which moves eq. 6 by at most (1/128) / log(M + 1)
        bound = u8_error_bound(u8[path]["flow.u8.lz4"], M, max_vector_scale=1.0) + PNG_STEP / 2 / np.log1p(M)
        assert np.abs(normalize_flow(lossy, M) - normalize_flow(flow, M)).max() <= bound + 1e-6


def test_loader_reads_the_same_flow_at_the_points_from_every_format(prepared):
    for split, augmentation in (("train", Augmentation(64, (1.0, MAX_SCALE))), ("val", Augmentation(64, train=False))):
        sets = {f: PairShards(folder, split, augmentation, num_points=64, max_magnitude=M) for f, folder in prepared.items()}
        png, i16, u8 = (sets[f] for f in ("kitti-png", "i16-zstd", "u8-lz4"))
        assert list(png.keys) == list(i16.keys) == list(u8.keys) and len(png) > 0
        for i in range(len(png)):
            reference, lossless, lossy = png[i], i16[i], u8[i]
            for other in (lossless, lossy):  # the same draw: crop, flip, points
                assert torch.equal(other["image"], reference["image"]) and torch.equal(other["points"], reference["points"])
            assert torch.equal(lossless["flow"], reference["flow"])
            bound = u8_error_bound(u8.read_members(i)[1], M, MAX_SCALE) + MAX_SCALE * PNG_STEP / 2 / np.log1p(M)
            assert (lossy["flow"] - reference["flow"]).abs().max() <= bound + 1e-6


def convert(source: Path, out: Path, flow_format: str, *extra: str) -> int:
    return crossflow(["convert-pairs", str(source), "--out", str(out), "--flow-format", flow_format, "--workers", "1", *extra])


def test_convert_between_lossless_formats_is_exact(prepared, tmp_path):
    assert convert(prepared["kitti-png"], tmp_path / "i16", "i16-zstd") == 0
    assert tar_outputs(tmp_path / "i16") == tar_outputs(prepared["i16-zstd"])  # the bytes prepare writes in that format
    converted, original = shard_samples(tmp_path / "i16"), shard_samples(prepared["kitti-png"])
    assert converted.keys() == original.keys()
    for path, sample in converted.items():
        assert np.array_equal(flow_of(sample)[0], flow_of(original[path])[0])
        assert sample["frame.jpg"] == original[path]["frame.jpg"]
        assert json.loads(sample["meta.json"]) == json.loads(original[path]["meta.json"]) | {"flow_format": "i16-zstd"}
    settings = json.loads((tmp_path / "i16" / "settings.json").read_text())
    assert settings["converted_from"] == {"flow_format": "kitti-png", "format_version": 4}
    assert settings["settings"] == json.loads((prepared["i16-zstd"] / "settings.json").read_text())["settings"]
    assert convert(tmp_path / "i16", tmp_path / "png", "kitti-png", "--workers", "2") == 0  # and back, in 2 processes
    assert tar_outputs(tmp_path / "png") == tar_outputs(prepared["kitti-png"])


def test_an_interrupted_convert_resumes_to_the_uninterrupted_result(prepared, tmp_path):
    out = tmp_path / "u8"
    (out / "train" / "shard-000001.tar").mkdir(parents=True)  # a folder at a shard's name: its rename fails
    with pytest.raises(IsADirectoryError):
        convert(prepared["kitti-png"], out, "u8-lz4")
    assert (out / "records" / "train-000000.json").is_file() and (out / "train" / "shard-000000.tar").is_file()
    assert not (out / "records" / "train-000001.json").exists() and not (out / "index.json").exists()
    assert not list(out.rglob("*.partial"))  # the failed shard's temp file is gone
    (out / "train" / "shard-000001.tar").rmdir()
    # a shard renamed into place but killed before its record, and cut short since: converted again
    (out / "records" / "train-000000.json").unlink()
    shard = out / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert convert(prepared["kitti-png"], out, "u8-lz4") == 0
    assert convert(prepared["kitti-png"], tmp_path / "uninterrupted", "u8-lz4") == 0
    assert tar_outputs(out) == tar_outputs(tmp_path / "uninterrupted")
    assert len(PairShards(out, "train", Augmentation(64, train=False), num_points=8)) == 9


def one_line_error(capsys) -> str:
    """The error line of stderr (after any progress bar), checked to be the only one and the last."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if ": error: " in line] == lines[-1:], lines
    return lines[-1]


def test_one_line_errors(prepared, tmp_path, capsys):
    source = prepared["kitti-png"]
    (tmp_path / "same").symlink_to(source)
    assert convert(source, tmp_path / "same", "u8-lz4") == 2
    assert "IN and --out are the same folder" in one_line_error(capsys)
    assert convert(tmp_path / "nothing", tmp_path / "out", "u8-lz4") == 2
    assert "no prepared pairs at" in one_line_error(capsys)
    assert convert(source, tmp_path / "out", "kitti-png") == 2
    assert "already holds kitti-png flow: choose another --flow-format" in one_line_error(capsys)
    assert convert(source, tmp_path / "out", "i16-zstd") == 0
    capsys.readouterr()
    assert convert(source, tmp_path / "out", "u8-lz4") == 2
    assert "holds other pairs (i16-zstd flow" in one_line_error(capsys)
    assert not list((tmp_path / "out").rglob("*.u8.lz4")) and not list((tmp_path / "out").rglob("*.partial"))
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    shard = damaged / "val" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        last_sample = next(m.offset for m in members if m.name.split(".")[0] == members[-1].name.split(".")[0])
        inside_a_sample = members[1].offset_data + 10
    for size in (700, inside_a_sample, last_sample):  # cut inside a header, inside a sample, between two samples
        shard.write_bytes((source / "val" / "shard-000000.tar").read_bytes()[:size])
        assert convert(damaged, tmp_path / f"from-damaged-{size}", "u8-lz4") == 2
        error = one_line_error(capsys)
        assert f"{shard} is damaged" in error and f"delete it and {damaged / 'records' / 'val-000000.json'}" in error
    shard.unlink()
    assert convert(damaged, tmp_path / "from-damaged", "u8-lz4") == 2
    assert f"{shard} is missing: rerun IN's prepare command" in one_line_error(capsys)


def test_prepare_refuses_to_resume_with_another_flow_format(prepared, tiny_videos, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(prepared["kitti-png"], out)
    before = outputs(out)
    assert crossflow(["prepare", str(tiny_videos), "--out", str(out), *PREPARE, "--flow-format", "u8-lz4"]) == 2
    error = one_line_error(capsys)
    assert "holds kitti-png flow, not u8-lz4: resume it with --flow-format kitti-png" in error
    assert f"crossflow convert-pairs {out} --out NEW --flow-format u8-lz4" in error
    assert outputs(out) == before


def legacy_folder(prepared_png: Path, out: Path) -> Path:
    """``prepared_png`` as format version 3 wrote it: no "flow_format" in meta.json or the settings."""
    shutil.copytree(prepared_png, out)
    for shard in out.glob("*/shard-*.tar"):
        samples = [{"__key__": path.rsplit("/", 1)[1], **sample} for path, sample in shard_samples(out).items()
                   if path.startswith(str(shard.relative_to(out)) + "/")]  # fmt: skip
        with wds.TarWriter(str(shard), encoder=False, mtime=0) as writer:
            for sample in samples:
                meta = json.loads(sample["meta.json"])
                del meta["flow_format"]
                writer.write(sample | {"meta.json": json.dumps(meta, sort_keys=True).encode()})
    for name in ("settings.json", "index.json"):
        data = json.loads((out / name).read_text())
        del data["settings"]["flow_format"]
        data["settings"]["format_version"] = 3
        if name == "index.json":
            data["format_version"] = 3
        (out / name).write_text(json.dumps(data))
    return out


def test_a_version_3_folder_still_trains_and_converts_as_kitti_png(prepared, tiny_videos, tmp_path, capsys):
    legacy = legacy_folder(prepared["kitti-png"], tmp_path / "legacy")
    assert len(PairShards(legacy, "train", Augmentation(64, train=False), num_points=8)[0]["flow"]) == 8
    assert convert(legacy, tmp_path / "i16", "i16-zstd") == 0
    new = {name: data for name, data in tar_outputs(tmp_path / "i16").items() if name.endswith(".tar")}
    assert new == {name: data for name, data in tar_outputs(prepared["i16-zstd"]).items() if name.endswith(".tar")}
    settings = json.loads((tmp_path / "i16" / "settings.json").read_text())
    assert settings["converted_from"] == {"flow_format": "kitti-png", "format_version": 3}
    capsys.readouterr()
    assert crossflow(["prepare", str(tiny_videos), "--out", str(legacy), *PREPARE, "--flow-format", "kitti-png"]) == 2
    assert "format_version 3 -> 4" in one_line_error(capsys)  # the version's own refusal, not the flow format's
