"""Pictures of what was learned: the RGB projection, kernel rows against their definitions and the loss,
activation maximisation, dense embeddings, the W&B callback, the `crossflow visualize` command on real and
awkward inputs, and the eval overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from crossflow.callbacks import EmbeddingPanels
from crossflow.cli import main as crossflow
from crossflow.data.pairs import PairDataModule
from crossflow.data.synthetic import PALETTE
from crossflow.losses import embedding_kernel, flow_kernel
from crossflow.models.alexnet import AlexNet
from crossflow.module import CrossFlowPretraining
from crossflow.visualize import (
    GRID_PADDING, embedding_kernel_row, embedding_to_rgb, flow_kernel_row, heatmap, maximise_activation,
    neuron_activation, predicted_flow, random_like, random_projection,
)
from evals.overlays import OverlayCollector, detection_comparison, draw_mask, segmentation_comparison, to_uint8

from .conftest import SHARED_DATA, requires_shared_data

CROP = 64  # training crop of the test checkpoints: frames are drawn at this short side


def panel_width(columns: int, width: int) -> int:
    """Width of a make_grid row of ``columns`` images ``width`` wide."""
    return columns * (width + GRID_PADDING) + GRID_PADDING


def train(tiny_pairs: Path, root: Path, objective: str, logger=False, callbacks=(), max_steps: int = 2) -> L.Trainer:
    """A few real training steps of a small CrossFlowPretraining on the tiny prepared pairs."""
    L.seed_everything(0)
    module = CrossFlowPretraining(objective=objective, taps=["conv1", "pool1", "conv3", "pool5"], hidden_dim=64, lr=1e-3)
    data = PairDataModule(str(tiny_pairs), crop_size=CROP, batch_size=4, num_points=32, num_workers=0)
    trainer = L.Trainer(
        max_steps=max_steps, logger=logger, callbacks=list(callbacks), log_every_n_steps=1, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1, default_root_dir=root,
    )
    trainer.fit(module, data)
    return trainer


@pytest.fixture(scope="module")
def checkpoints(tiny_pairs, tmp_path_factory) -> dict[str, Path]:
    """A cross-pixel and a flow-classification checkpoint, each two training steps old."""
    root = tmp_path_factory.mktemp("visualize_checkpoints")
    paths = {}
    for objective in ("cross_pixel", "flow_classification"):
        paths[objective] = root / f"{objective}.ckpt"
        train(tiny_pairs, root / objective, objective).save_checkpoint(paths[objective])
    return paths


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


# ------------------------------------------------------------------------------------------------ projection
def test_projection_is_fixed_per_seed_and_orthonormal():
    first, again, other = random_projection(16, seed=3), random_projection(16, seed=3), random_projection(16, seed=4)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    torch.testing.assert_close(first.T @ first, torch.eye(3), atol=1e-6, rtol=0)


def test_embedding_colours_follow_the_formula_and_do_not_depend_on_the_image():
    projection = random_projection(16, seed=0)
    phi = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    expected = (0.5 + 4 / 4 * (projection.T @ phi)).clamp(0, 1)  # 0.5 + sqrt(D) / 4 * P^T phi, D = 16
    small = phi.view(1, 16, 1, 1).expand(1, 16, 2, 3)
    large = torch.cat([phi.view(1, 16, 1, 1).expand(1, 16, 5, 4), torch.randn(1, 16, 5, 4)], dim=3)
    torch.testing.assert_close(embedding_to_rgb(small)[0, :, 1, 2], expected)
    torch.testing.assert_close(embedding_to_rgb(large)[0, :, 4, 0], expected)  # same phi, another image: same colour
    # the first projection axis itself gives (1, 0.5, 0.5) before clamping -> red channel saturated
    torch.testing.assert_close(embedding_to_rgb(projection[:, 0].view(1, 16, 1, 1))[0, :, 0, 0], torch.tensor([1.0, 0.5, 0.5]))


def test_predicted_flow_is_the_centre_of_the_argmax_bin():
    logits = torch.full((1, 8, 1, 1), -1.0)
    logits[0, 0], logits[0, 4 + 3] = 5.0, 5.0  # u: bin 0 of 4 -> -0.75; v: bin 3 of 4 -> 0.75
    torch.testing.assert_close(predicted_flow(logits)[0, :, 0, 0], torch.tensor([-0.75, 0.75]))


# ------------------------------------------------------------------------------------------------ kernel rows
def test_kernel_rows_match_their_definitions_and_the_losss_kernels():
    generator = torch.Generator().manual_seed(0)
    height, width, sigma2 = 5, 7, 0.05
    flow = torch.rand(2, height, width, generator=generator) * 2 - 1
    embeddings = torch.randn(16, height, width, generator=generator)
    x, y = 3, 2
    row = flow_kernel_row(flow, (x, y), sigma2)
    by_hand = torch.exp(-((flow - flow[:, y, x].view(2, 1, 1)) ** 2).sum(0) / (2 * sigma2))
    torch.testing.assert_close(row, by_hand)
    assert row[y, x] == 1.0 and row.max() == 1.0
    cosine = torch.nn.functional.cosine_similarity(embeddings, embeddings[:, y, x].view(16, 1, 1), dim=0)
    torch.testing.assert_close(embedding_kernel_row(embeddings, (x, y)), 0.25 * cosine)
    assert embedding_kernel_row(embeddings, (x, y))[y, x].item() == pytest.approx(0.25)
    # the loss's N x N kernels over all pixels: row p is the picture of pixel p
    p = y * width + x
    torch.testing.assert_close(row.flatten(), flow_kernel(flow.flatten(1).T[None], sigma2)[0, p])
    torch.testing.assert_close(embedding_kernel_row(embeddings, (x, y)).flatten(), embedding_kernel(embeddings.flatten(1).T[None])[0, p])


def test_heatmap_puts_the_top_colour_at_the_pixel_and_marks_it():
    values = torch.zeros(20, 30)
    values[10, 15] = 1.0
    top = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0, ::-1]
    plain = heatmap(values, 0.0, 1.0)
    assert plain.dtype == torch.uint8 and plain.shape == (3, 20, 30)
    assert plain[:, 10, 15].tolist() == top.tolist() and plain[:, 0, 0].tolist() != top.tolist()
    assert heatmap(values, 0.0, 1.0, point=(15, 10))[:, 10, 15].tolist() == [255, 0, 0]  # the red mark


# ------------------------------------------------------------------------------------------------ activation maximisation
def test_activation_maximisation_raises_each_target_activation_and_leaves_the_network_alone():
    network = random_like(AlexNet().eval(), seed=0)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    channels = [7, 42]
    stimuli = maximise_activation(network, channels, size=64, steps=25, seed=1)
    assert stimuli.images.shape == (2, 3, 64, 64) and 0 <= stimuli.images.min() and stimuli.images.max() <= 1
    assert (stimuli.final > stimuli.initial + 0.5).all(), (stimuli.initial, stimuli.final)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    first, again = (maximise_activation(network, channels, size=64, steps=2, seed=1) for _ in range(2))
    assert torch.equal(first.images, again.images)  # seeded: the same stimuli


def test_neuron_activation_is_the_pre_relu_centre_response():
    network = random_like(AlexNet().eval(), seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conv4 = network(images, ("conv4",))["conv4"]
        conv5 = network.conv("conv5")(conv4)  # 4x4 map at 64 px: centre (2, 2)
        torch.testing.assert_close(neuron_activation(network, images, [5, 9]), conv5[[0, 1], [5, 9], 2, 2])


def test_random_like_keeps_the_architecture_and_the_global_rng():
    network = AlexNet().eval()
    state = torch.random.get_rng_state()
    first, again = random_like(network, seed=5), random_like(network, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.conv("conv5").weight, again.conv("conv5").weight)
    assert not torch.equal(first.conv("conv5").weight, network.conv("conv5").weight)


# ------------------------------------------------------------------------------------------------ dense embeddings
def test_dense_embeddings_are_unit_vectors_equal_to_the_sparse_forward():
    torch.manual_seed(0)
    module = CrossFlowPretraining(taps=["conv1", "pool1", "conv3", "pool5"], hidden_dim=32).eval()
    images = torch.randn(2, 3, 48, 56)
    dense = module.dense_embeddings(images, chunk=500)
    assert dense.shape == (2, 16, 48, 56)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 48, 56))
    points = torch.tensor([[[0.0, 0.0], [55.0, 47.0], [13.0, 30.0]]]).expand(2, -1, -1)
    with torch.no_grad():
        sparse = torch.nn.functional.normalize(module(images, points), dim=-1)
    xs, ys = points[0, :, 0].long(), points[0, :, 1].long()
    torch.testing.assert_close(dense[:, :, ys, xs].transpose(1, 2), sparse, atol=1e-5, rtol=1e-4)
    baseline = CrossFlowPretraining(objective="flow_classification", taps=["conv1"], hidden_dim=8, num_bins=4)
    assert baseline.dense_output(images).shape == (2, 8, 48, 56)
    with pytest.raises(ValueError, match="no embedding"):
        baseline.dense_embeddings(images)


# ------------------------------------------------------------------------------------------------ callback
def test_callback_logs_panels_sigma2_and_throughput_to_an_offline_wandb_run(tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="crossflow-test", offline=True)
    panels = EmbeddingPanels(every_n_steps=2, num_frames=2)
    train(tiny_pairs, tmp_path, "cross_pixel", logger=logger, callbacks=[panels], max_steps=2)
    summary = dict(logger.experiment.summary)  # the run's last logged values
    logger.experiment.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    media = run / "files" / "media" / "images" / "panels"
    embedding, kernels = sorted(media.glob("embedding_*.png")), sorted(media.glob("kernels_*.png"))
    assert len(embedding) == len(kernels) == 4  # 2 frames, before the first step and at step 2
    assert read_png(embedding[0]).shape == (CROP + 2 * GRID_PADDING, panel_width(3, CROP), 3)  # frame | flow | embedding
    assert read_png(kernels[0]).shape == (3 * (CROP + GRID_PADDING) + GRID_PADDING, panel_width(3, CROP), 3)
    # the module's own self.log values reach the same run
    assert {"panels/embedding", "panels/kernels", "train/sigma2", "train/images_per_sec"} <= summary.keys()
    assert summary["train/sigma2"] == pytest.approx(0.01, rel=0.1)  # sigma2_init, after two small Adam steps


def test_callback_is_quiet_without_wandb(tiny_pairs, tmp_path):
    panels = EmbeddingPanels(every_n_steps=1, num_frames=2)
    train(tiny_pairs, tmp_path, "cross_pixel", callbacks=[panels], max_steps=1)
    assert panels.frames is None  # never even read the validation frames


# ------------------------------------------------------------------------------------------------ command
@requires_shared_data
def test_command_on_a_real_clip_writes_every_panel(checkpoints, tmp_path, capsys):
    video = SHARED_DATA / "video" / "realshort.mp4"  # 320x240 -> short side 64: 85x64
    out = tmp_path / "out"
    args = ["visualize", str(checkpoints["cross_pixel"]), str(video), "--out", str(out), "--frames", "2",
            "--neurons", "4", "--steps", "10", "--stimulus-size", "64", "--pixel", "0.5,0.5"]
    assert crossflow(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["conv5_stimuli.png", "realshort_t00000_embedding.png", "realshort_t00000_kernels.png",
                     "realshort_t00030_embedding.png", "realshort_t00030_kernels.png"]  # 36 frames, gap 5: t = 0, 30
    assert read_png(out / "realshort_t00000_embedding.png").shape == (64 + 2 * GRID_PADDING, panel_width(3, 85), 3)
    kernels = read_png(out / "realshort_t00000_kernels.png")
    assert kernels.shape == (64 + 2 * GRID_PADDING, panel_width(3, 85), 3)  # one pixel: frame | K_f | K_phi
    centre = (GRID_PADDING + 32, 2 * GRID_PADDING + 85 + 42)  # the K_f cell at pixel (42, 32): the red mark
    assert kernels[centre].tolist() == [0, 0, 255]  # BGR red
    assert "mean target activation" in capsys.readouterr().out


def test_command_on_a_folder_with_grayscale_odd_sizes_and_a_non_image(checkpoints, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (37, 60), dtype=np.uint8), (5, 5), 2)
    cv2.imwrite(str(folder / "a.png"), texture)  # grayscale, 60x37
    cv2.imwrite(str(folder / "b.png"), np.roll(texture, 2, axis=1))  # the next frame: moved 2 px right
    cv2.imwrite(str(folder / "c.jpg"), rng.integers(0, 256, (13, 90, 3), dtype=np.uint8))  # wide and tiny, a still
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="notes.txt"):
        assert crossflow(["visualize", str(checkpoints["cross_pixel"]), str(folder), "--out", str(out), "--neurons", "0"]) == 0
    assert "2 still frame(s)" in capsys.readouterr().out  # b (last of its size) and c
    width_a, width_c = round(60 * CROP / 37), round(90 * CROP / 13)
    assert read_png(out / "a_embedding.png").shape == (CROP + 2 * GRID_PADDING, panel_width(3, width_a), 3)
    assert read_png(out / "a_kernels.png").shape[1] == panel_width(3, width_a)
    assert read_png(out / "b_embedding.png").shape[1] == panel_width(2, width_a)  # still: frame | embedding
    assert read_png(out / "c_kernels.png").shape == (3 * (CROP + GRID_PADDING) + GRID_PADDING, panel_width(2, width_c), 3)
    assert not (out / "conv5_stimuli.png").exists()


def test_command_on_a_baseline_checkpoint_says_so_and_draws_what_applies(checkpoints, tiny_pairs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["visualize", str(checkpoints["flow_classification"]), str(tiny_pairs), "--out", str(out), "--frames", "2",
            "--neurons", "2", "--steps", "3", "--stimulus-size", "64"]
    assert crossflow(args) == 0
    said = capsys.readouterr().out.splitlines()
    assert sum("flow_classification (direct baseline)" in line and "not an embedding" in line for line in said) == 1
    panels = sorted(out.glob("*_embedding.png"))
    assert len(panels) == 2 and not list(out.glob("*_kernels.png")) and (out / "conv5_stimuli.png").is_file()
    assert read_png(panels[0]).shape == (CROP + 2 * GRID_PADDING, panel_width(3, CROP), 3)  # frame | flow | predicted


def test_command_errors_are_one_line(checkpoints, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no pictures here")
    checkpoint = str(checkpoints["cross_pixel"])
    with pytest.warns(UserWarning):
        assert crossflow(["visualize", checkpoint, str(empty), "--out", str(tmp_path / "o")]) == 2
    assert crossflow(["visualize", checkpoint, str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o")]) == 2
    assert crossflow(["visualize", str(empty / "readme.md"), str(empty), "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[0] for line in errors] == ["crossflow visualize"] * 3
    assert "no readable frames" in errors[0] and "input not found" in errors[1] and "not a crossflow pretraining checkpoint" in errors[2]


# ------------------------------------------------------------------------------------------------ eval overlays
def test_detection_overlay_draws_truth_and_confident_detections_side_by_side():
    image = torch.zeros(3, 40, 50)  # the mean colour once denormalised
    mean_colour = to_uint8(image)[:, 0, 0].tolist()
    truth = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 30.0]]), "labels": torch.tensor([11])}
    prediction = {"boxes": torch.tensor([[10.0, 4.0, 20.0, 10.0], [0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([11, 3]),
                  "scores": torch.tensor([0.9, 0.1])}
    overlay = detection_comparison(image, truth, prediction, scale=2.0)
    assert overlay.shape == (3, 40 + 4, 2 * 50 + 6)
    left, right = overlay[:, 2:42, 2:52], overlay[:, 2:42, 54:104]
    assert left[:, 20, 5].tolist() == [0, 255, 0]  # the truth box's left edge, green
    assert right[:, 14, 20].tolist() == [255, 64, 0]  # the 0.9 detection at twice its coordinates: left edge x = 20
    assert right[:, 1, 1].tolist() == mean_colour  # the 0.1 detection is below the score threshold


def test_segmentation_overlay_colours_classes_in_voc_colours_and_leaves_void():
    image = torch.zeros(3, 4, 4)
    mean_colour = to_uint8(image)[:, 0, 0].tolist()
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 255, 255], [15, 15, 15, 15]])
    opaque = draw_mask(to_uint8(image), truth, alpha=1.0)
    assert opaque[:, 0, 2].tolist() == PALETTE[3:6] and opaque[:, 3, 0].tolist() == PALETTE[45:48]
    assert opaque[:, 0, 0].tolist() == opaque[:, 2, 1].tolist() == mean_colour  # background and void undrawn
    void = torch.full_like(truth, 255)
    overlay = segmentation_comparison(image, truth, void)
    assert overlay.shape == (3, 4 + 4, 2 * 4 + 6)
    assert torch.equal(overlay[:, 2:6, 2:6], draw_mask(to_uint8(image), truth))  # ground truth | prediction
    assert torch.equal(overlay[:, 2:6, 8:12], to_uint8(image))  # an all-void prediction leaves the image as it is


def test_overlays_are_logged_to_an_offline_wandb_run_up_to_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="crossflow-test", offline=True)
    trainer = L.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    collector = OverlayCollector("test/segmentations", limit=2)
    for index in range(3):
        mask = torch.tensor([[0, index], [1, 255]])
        collector.add(lambda: segmentation_comparison(torch.zeros(3, 2, 2), mask, mask), f"test image {index}")
    collector.log(trainer)
    logger.experiment.finish()
    logged = sorted((tmp_path / "wandb").glob("offline-run-*/files/media/images/test/segmentations/*.png"))
    assert [p.name.split("_")[0] for p in logged] == ["0", "1"] and read_png(logged[0]).shape == (2 + 4, 2 * 2 + 6, 3)
    assert collector.images == []  # forgotten once logged
