"""Scale/crop/flip augmentation keeps frame and flow consistent; pixel sampling; batch contents."""

import cv2
import numpy as np
import pytest

from crossflow.data.pairs import Augmentation, read_index, sample_points


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((height // 4, width // 4, 3)).astype(np.float32)
    return (cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def translated(frame: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """frame1 such that frame1(x + d) = frame0(x): the flow 0 -> 1 is the constant d."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(frame, matrix, frame.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def warp_back(frame1: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """frame1 sampled at x + flow(x): equals frame0 where the flow is right."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame1, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("seed", range(6))
def test_known_translation_stays_correct_after_scale_crop_flip(seed):
    frame0 = textured(144, 192)
    dx, dy = 3.0, -2.0
    frame1 = translated(frame0, dx, dy)
    flow = np.broadcast_to(np.float32([dx, dy]), (144, 192, 2)).copy()
    valid = np.ones((144, 192), bool)
    augment = Augmentation(crop_size=96, scale_range=(0.8, 1.6))
    aug0, aug_flow, aug_valid = augment(frame0, flow, valid, np.random.default_rng(seed))
    aug1, _, _ = augment(frame1, flow, valid, np.random.default_rng(seed))  # same draws: same scale, crop, flip
    assert aug0.shape == (96, 96, 3) and aug_flow.shape == (96, 96, 2) and aug_valid.all()
    factor = np.abs(aug_flow[48, 48] / np.float32([dx, dy]))
    assert factor[0] == pytest.approx(factor[1], rel=0.02)  # one scale for both axes
    interior = (slice(8, -8), slice(8, -8))
    error = np.abs(warp_back(aug1, aug_flow).astype(float) - aug0.astype(float))[interior].mean()
    wrong = np.abs(warp_back(aug1, aug_flow * np.float32([-1, 1])).astype(float) - aug0.astype(float))[interior].mean()
    still = np.abs(aug1.astype(float) - aug0.astype(float))[interior].mean()
    assert error < 0.1 * still and wrong > 10 * error  # resampling leaves a few grey levels of error


def test_evaluation_is_a_centre_crop_at_scale_one():
    frame = textured(144, 192)
    flow = np.dstack(np.meshgrid(np.arange(192, dtype=np.float32), np.arange(144, dtype=np.float32)))  # flow = position
    out_frame, out_flow, _ = Augmentation(crop_size=144, train=False)(frame, flow, np.ones((144, 192), bool), np.random.default_rng(0))
    assert np.array_equal(out_frame, frame[:, 24:168]) and np.array_equal(out_flow, flow[:, 24:168])


def test_invalid_flow_is_not_smeared_into_valid_pixels():
    flow = np.zeros((100, 100, 2), np.float32)
    valid = np.ones((100, 100), bool)
    valid[:, :50] = False
    flow[:, :50] = 400.0  # garbage where invalid
    _, out_flow, out_valid = Augmentation(crop_size=100, scale_range=(1.3, 1.3))(textured(100, 100), flow, valid, np.random.default_rng(0))
    assert np.abs(out_flow[out_valid]).max() == 0.0 and out_valid.any() and not out_valid.all()


def test_points_are_drawn_among_valid_pixels_without_repeats():
    valid = np.zeros((32, 32), bool)
    valid[4:12, 20:30] = True
    points = sample_points(valid, 50, np.random.default_rng(0))
    assert valid[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    assert len({tuple(p) for p in points}) == 50


def test_missing_pairs_folder_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="crossflow prepare"):
        read_index(tmp_path / "nowhere")
