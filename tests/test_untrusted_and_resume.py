"""Files from strangers and interrupted runs: a checkpoint carrying code is refused everywhere and never run; a
`crossflow fit` killed inside an epoch resumes to the same weights as a run never stopped; SIGTERM saves and exits
cleanly; a full disk or a read-only folder is one line and leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from crossflow.cli import main as crossflow
from crossflow.data.resumable import EpochSampler, SeededItems
from crossflow.module import CrossFlowPretraining

from .conftest import REPO

CROSSFLOW = [sys.executable, "-m", "crossflow.cli"]
EVAL_CONFIGS = ["demo_in1k_linear", "demo_voc07_cls", "demo_voc07_det", "demo_voc12_seg"]
TINY_FIT = ["--data.init_args.crop_size", "64", "--data.init_args.num_points", "32", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "csv"]


class CreatesFile:
    """Unpickling this calls ``Path(target).touch()``: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def with_interval(config: str, steps: int, out: Path) -> Path:
    """A copy of ``configs/<config>.yaml`` whose ResumableCheckpoint saves every ``steps`` steps."""
    text = (REPO / "configs" / f"{config}.yaml").read_text()
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "crossflow.callbacks.ResumableCheckpoint" in line)
    at = next(i for i in range(at, len(lines)) if "every_n_train_steps:" in lines[i])
    lines[at] = f"        every_n_train_steps: {steps}\n"
    out.write_text("".join(lines))
    return out


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = state(first), state(second)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} of {len(a['state_dict'])} tensors differ, e.g. {different[:3]}"


def interrupt(args: list[str], cwd: Path, checkpoint: Path, when, how: signal.Signals) -> tuple[int, str]:
    """Run ``crossflow *args`` in ``cwd``; once ``checkpoint`` exists and ``when(its content)`` holds, send ``how``.
    Returns the exit status and the output."""
    log = cwd / "interrupted.log"
    process = subprocess.Popen([*CROSSFLOW, *args], cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.is_file() and when(state(checkpoint)):  # written atomically: never read half-written
                process.send_signal(how)
                break
            time.sleep(0.05)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return status, log.read_text()


def one_line_error(capsys, command: str) -> str:
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"crossflow {command}: error:"), error
    return error


# ------------------------------------------------------------------------------------------ untrusted files
def test_a_checkpoint_carrying_code_is_refused_by_every_command_and_never_run(tiny_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"
    evil = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {"log_sigma2": torch.zeros(())}, "hyper_parameters": {"note": CreatesFile(marker)}}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("init.ckpt", "best.ckpt"):
        shutil.copy(evil, run / "checkpoints" / name)
    demo = str(REPO / "configs" / "pretrain" / "demo.yaml")
    commands = [
        ["export", str(evil), str(tmp_path / "backbone.pt")],
        ["summary", str(run)],
        ["visualize", str(evil), str(tiny_pairs), "--out", str(tmp_path / "pictures")],
        ["fit", "--config", demo, "--data.init_args.data_dir", str(tiny_pairs), "--ckpt_path", str(evil)],
        *(["test", "--config", str(REPO / "configs" / "eval" / f"{c}.yaml"), "--ckpt_path", str(evil)] for c in EVAL_CONFIGS),
        ["fit", "--config", str(REPO / "configs" / "eval" / "demo_in1k_linear.yaml"), "--model.init_args.backbone", str(evil)],
    ]
    for command in commands:
        assert crossflow(command) == 2, command
        assert "refused: loading it would build objects that can run code" in one_line_error(capsys, command[0])
        assert not marker.exists(), command
    assert not (tmp_path / "backbone.pt").exists() and not (tmp_path / "pictures").exists()

    # `--ckpt_path last`: the file is found and read by the trainer itself, through crossflow's checkpoint plug-in
    checkpoints = tmp_path / "runs" / "pretrain" / "demo" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(evil, checkpoints / "last.ckpt")
    assert crossflow(["fit", "--config", demo, "--data.init_args.data_dir", str(tiny_pairs), *TINY_FIT, "--ckpt_path", "last"]) == 2
    assert "refused" in one_line_error(capsys, "fit") and not marker.exists()


# ------------------------------------------------------------------------------------- resumable pieces
def test_seeded_items_depend_only_on_seed_epoch_and_index_and_leave_the_callers_generators():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return (i, torch.rand(()).item(), float(np.random.rand()), random.random())

    items = SeededItems(Noisy(), seed=7)
    first = items[(2, 3)]
    torch.rand(10), np.random.rand(10), random.random()  # whatever ran before, in whichever worker
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert items[(2, 3)] == first and items[(3, 3)] != first and SeededItems(Noisy(), 8)[(2, 3)] != first
    assert torch.equal(torch.get_rng_state(), before)
    assert items[3][0] == 3  # a plain index is the dataset's item as it is


def test_epoch_sampler_is_a_permutation_per_epoch_that_starts_where_told():
    sampler = EpochSampler(list(range(10)), seed=3)
    sampler.set_epoch(1)
    whole = list(sampler)
    assert sorted(whole) == list(range(10)) and list(sampler) == whole
    sampler.set_epoch(2)
    assert list(sampler) != whole
    sampler.set_epoch(1)
    sampler.start = 4
    assert list(sampler) == whole[4:] and list(sampler) == whole  # the start applies once


# ----------------------------------------------------------------------------------- interrupted training
@pytest.fixture(scope="module")
def resume_setup(tiny_pairs, tmp_path_factory):
    """The demo config saving every 3 steps (4 steps an epoch here) and an uninterrupted 10-step run of it."""
    root = tmp_path_factory.mktemp("resume")
    config = with_interval("pretrain/demo", 3, root / "demo.yaml")
    args = ["fit", "--config", str(config), "--data.init_args.data_dir", str(tiny_pairs), *TINY_FIT]
    (root / "whole").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "whole")
        assert crossflow([*args, "--trainer.max_steps", "10"]) == 0
    return root, args, root / "whole" / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt"


def resumed(args: list[str], folder: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert crossflow([*args, "--trainer.max_steps", "10", "--ckpt_path", "last"]) == 0
    return folder / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_fit_killed_inside_an_epoch_resumes_to_the_weights_of_an_uninterrupted_run(resume_setup):
    root, args, whole = resume_setup
    folder = root / "killed"
    folder.mkdir()
    last = folder / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt"
    # max_steps 1000: the run cannot end before the signal, and the schedule does not depend on it
    status, _ = interrupt([*args, "--trainer.max_steps", "1000"], folder, last, lambda c: c["global_step"] % 4 != 0, signal.SIGKILL)
    assert status == -signal.SIGKILL
    position = state(last)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert 0 < position["batches"] < 4  # inside an epoch
    assert_same_weights(resumed(args, folder), whole)  # bitwise: same samples, order, augmentation and draws, on CPU


class SigtermAt(L.Callback):
    """Sends this process SIGTERM from ``hook`` at global step ``step``: the signal landing at a chosen moment."""

    def __init__(self, hook: str, step: int):
        self.step = step
        setattr(self, hook, self.signal)

    def signal(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("hook, step", [("on_train_batch_end", 2), ("on_train_batch_end", 4),
                                        ("on_validation_batch_start", 4), ("on_train_epoch_end", 4)],
                         ids=["inside an epoch", "on an epoch's last batch", "in validation", "at an epoch's end"])
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_run_resumes_exactly(resume_setup, hook, step):
    """4 steps an epoch: step 4 ends epoch 0, whose validation and end hooks follow."""
    root, args, whole = resume_setup
    folder = root / f"terminated_{hook}_{step}"
    folder.mkdir()
    last = folder / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt"
    at = json.dumps({"class_path": f"{__name__}.SigtermAt", "init_args": {"hook": hook, "step": step}})
    run = subprocess.run([*CROSSFLOW, *args, "--trainer.max_steps", "1000", f"--trainer.callbacks+={at}"], cwd=folder,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"SIGTERM: saved {last} at step {step}; continue with --ckpt_path last" in run.stdout + run.stderr
    assert state(last)["global_step"] == step
    assert_same_weights(resumed(args, folder), whole)


@pytest.mark.slow
def test_an_eval_killed_inside_an_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The linear probe (augmentation with torchvision's random crop and flip, 3 batches an epoch here)."""
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "imagenet"
    assert crossflow(["synth", "imagenet", "--out", str(images), "--images-per-class", "3", "--val-per-class", "1"]) == 0
    config = with_interval("eval/demo_in1k_linear", 2, tmp_path / "probe.yaml")
    args = ["fit", "--config", str(config), "--data.init_args.root", str(images), "--data.init_args.batch_size", "16",
            "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "csv"]
    last_of = lambda folder: folder / "runs" / "eval" / "demo_in1k_linear" / "checkpoints" / "last.ckpt"  # noqa: E731
    for name in ("whole", "killed"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    assert crossflow([*args, "--trainer.max_steps", "7"]) == 0
    status, _ = interrupt([*args, "--trainer.max_steps", "1000"], tmp_path / "killed", last_of(tmp_path / "killed"),
                          lambda c: c["global_step"] % 3 != 0, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert state(last_of(tmp_path / "killed"))["global_step"] < 7
    monkeypatch.chdir(tmp_path / "killed")
    assert crossflow([*args, "--trainer.max_steps", "7", "--ckpt_path", "last"]) == 0
    assert_same_weights(last_of(tmp_path / "killed"), last_of(tmp_path / "whole"))


# ------------------------------------------------------------------------------------ full disk, read-only
def pretraining_checkpoint(path: Path) -> Path:
    module = CrossFlowPretraining(taps=["conv1"], hidden_dim=8)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def run_with_file_size_limit(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """``crossflow *args`` where no file may grow past ``limit`` bytes (RLIMIT_FSIZE: writes fail with EFBIG, as
    they fail with ENOSPC on a full disk, for root too)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([*CROSSFLOW, *args], cwd=cwd, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)


def assert_one_line_write_error(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"crossflow {command}: error: cannot write") and "File too large" in error, error


@pytest.mark.slow
def test_a_full_disk_in_prepare_fit_and_export_is_one_line_and_nothing_looks_complete(tiny_videos, tiny_pairs, tmp_path):
    checkpoint = pretraining_checkpoint(tmp_path / "pretrained.ckpt")
    result = run_with_file_size_limit(["export", str(checkpoint), "out/backbone.pt"], 1 << 20, tmp_path)
    assert_one_line_write_error(result, "export")
    assert not any((tmp_path / "out").iterdir())  # no backbone.pt, no temporary file

    result = run_with_file_size_limit(["prepare", str(tiny_videos), "--out", "pairs", "--frames-per-video", "3", "--gap", "2",
                                       "--short-side", "72", "--workers", "1"], 16 << 10, tmp_path)
    assert_one_line_write_error(result, "prepare")
    assert not (tmp_path / "pairs" / "index.json").exists() and not list((tmp_path / "pairs").rglob("*.tar"))

    demo = str(REPO / "configs" / "pretrain" / "demo.yaml")
    result = run_with_file_size_limit(["fit", "--config", demo, "--data.init_args.data_dir", str(tiny_pairs), *TINY_FIT], 1 << 20, tmp_path)
    assert_one_line_write_error(result, "fit")
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can create files in, root included: the immutable attribute (chmod does not stop root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs e2fsprogs, a filesystem with attributes and CAP_LINUX_IMMUTABLE)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_output_folder_is_one_line_for_export_and_fit(read_only_folder, tiny_pairs, tmp_path, capsys, monkeypatch):
    checkpoint = pretraining_checkpoint(tmp_path / "pretrained.ckpt")
    assert crossflow(["export", str(checkpoint), str(read_only_folder / "backbone.pt")]) == 2
    assert "Operation not permitted" in one_line_error(capsys, "export")
    monkeypatch.chdir(read_only_folder)
    demo = str(REPO / "configs" / "pretrain" / "demo.yaml")
    assert crossflow(["fit", "--config", demo, "--data.init_args.data_dir", str(tiny_pairs), *TINY_FIT, "--trainer.max_steps", "1"]) == 2
    assert "cannot write" in one_line_error(capsys, "fit")
    assert not any(read_only_folder.iterdir())
