"""crossflow.flow: file formats, eq. 6 normalisation, and the estimators on real ground truth."""

import math

import cv2
import numpy as np
import pytest
import torch

from crossflow.flow import (
    FLOW_METHODS,
    decode_flow_member,
    decode_kitti_png_bytes,
    encode_flow_member,
    encode_kitti_png_bytes,
    estimate_flow,
    normalize_flow,
    u8_error_bound,
    read_flo,
    read_flow,
    write_flo,
    write_flow,
)

from .conftest import SHARED_DATA

DATA = SHARED_DATA
MIDDLEBURY = DATA / "flow" / "middlebury"
KITTI = DATA / "flow" / "kitti"
SEQUENCES = ("Dimetrodon", "Grove2", "Hydrangea", "RubberWhale", "Urban2")
needs_middlebury = pytest.mark.skipif(not MIDDLEBURY.is_dir(), reason=f"real flow data not found at {MIDDLEBURY}")
needs_kitti = pytest.mark.skipif(not KITTI.is_dir(), reason=f"KITTI devkit files not found at {KITTI}")
needs_contrib = pytest.mark.skipif(not hasattr(cv2, "optflow"), reason="needs opencv-contrib (cv2.optflow)")


def random_flow(seed=0, shape=(37, 53), scale=100.0):
    return np.random.default_rng(seed).uniform(-scale, scale, shape + (2,)).astype(np.float32)


def epe(flow, gt, valid):
    """Per-pixel endpoint errors at valid pixels."""
    return np.linalg.norm(flow - gt, axis=-1)[valid]


def middlebury(sequence):
    """(frame10 gray, frame11 gray, flow, valid) of a Middlebury sequence."""
    folder = MIDDLEBURY / sequence
    frames = [cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE) for name in ("frame10.png", "frame11.png")]
    return (*frames, *read_flo(folder / "flow10.flo"))


# File formats


def test_kitti_png_round_trip_is_exact_to_a_64th_of_a_pixel():
    flow = random_flow()
    decoded, valid = decode_kitti_png_bytes(encode_kitti_png_bytes(flow))
    assert decoded.dtype == np.float32 and decoded.shape == flow.shape and valid.all()
    assert np.abs(decoded - flow).max() <= 1 / 128 + 1e-6
    quantised = np.round(flow * 64) / 64
    assert np.array_equal(decode_kitti_png_bytes(encode_kitti_png_bytes(quantised))[0], quantised)


def kitti_ground_truth() -> tuple[np.ndarray, np.ndarray]:
    """The KITTI devkit's sparse ground truth (real flow with holes), or where it is absent a synthetic field of
    its magnitudes (its vectors reach 224 px)."""
    if KITTI.is_dir():
        return read_flow(KITTI / "flow_gt.png")
    flow = random_flow(3, scale=224.0)
    return flow, np.random.default_rng(3).random(flow.shape[:2]) < 0.4


@pytest.mark.parametrize("holes", [False, True])
def test_int16_zstd_member_decodes_to_exactly_what_the_kitti_png_decodes_to(holes):
    flow, valid = kitti_ground_truth()
    valid = valid if holes else np.ones_like(valid)
    flow = np.where(valid[..., None], flow, 0) + np.float32([600, -700]) * (np.arange(flow.shape[1]) % 97 == 0)[:, None]  # clipped
    name, data = encode_flow_member(flow, valid, "i16-zstd")
    expected, expected_valid = decode_kitti_png_bytes(encode_kitti_png_bytes(flow, valid))
    decoded, decoded_valid = decode_flow_member(name, data)
    assert name == "flow.i16.zst" and np.array_equal(decoded_valid, expected_valid)
    assert np.array_equal(decoded[valid], expected[valid])  # flow.png keeps garbage at invalid pixels; this format zeros


@pytest.mark.parametrize("holes", [False, True])
def test_uint8_lz4_member_error_in_normalised_flow_stays_within_its_bound(holes):
    flow, valid = kitti_ground_truth()
    valid = valid if holes else np.ones_like(valid)
    flow = np.where(valid[..., None], flow, 1e4)  # far-off values where invalid must not widen the levels
    name, data = encode_flow_member(flow, valid, "u8-lz4")
    decoded, decoded_valid = decode_flow_member(name, data)
    assert name == "flow.u8.lz4" and np.array_equal(decoded_valid, valid)
    bound = u8_error_bound(data, max_vector_scale=1.0)
    errors = []
    for scale in (1.0, 0.7, 1.5):  # augmentation scales the vectors before eq. 6
        error = np.abs(normalize_flow(scale * decoded[valid]) - normalize_flow(scale * flow[valid])).max()
        assert error <= max(1.0, scale) * bound + 1e-6
        errors.append(error)
    assert bound < 0.006 and max(errors) > bound / 4  # sigma / 10 for the paper's sigma^2 = 0.0036; the bound is tight


def test_damaged_or_unknown_flow_members_raise_value_errors():
    name, data = encode_flow_member(random_flow(), None, "u8-lz4")
    with pytest.raises(ValueError, match="does not decompress"):
        decode_flow_member(name, data[:-20])
    with pytest.raises(ValueError, match="unknown flow member"):
        decode_flow_member("flow.bmp", data)
    with pytest.raises(ValueError, match="unknown flow format"):
        encode_flow_member(random_flow(), None, "jpeg")


def test_kitti_png_keeps_the_valid_mask(tmp_path):
    flow = random_flow(1)
    valid = np.random.default_rng(2).random(flow.shape[:2]) < 0.3
    write_flow(tmp_path / "flow.png", flow, valid)
    decoded, decoded_valid = read_flow(tmp_path / "flow.png")
    assert np.array_equal(decoded_valid, valid)
    assert np.abs(decoded - flow)[valid].max() <= 1 / 128 + 1e-6


def test_flo_round_trip(tmp_path):
    flow = random_flow(3)
    write_flo(tmp_path / "a.flo", flow)
    decoded, valid = read_flo(tmp_path / "a.flo")
    assert np.array_equal(decoded, flow) and valid.all()
    mask = np.random.default_rng(4).random(flow.shape[:2]) < 0.5
    write_flow(tmp_path / "b.flo", flow, mask)
    decoded, valid = read_flow(tmp_path / "b.flo")
    assert np.array_equal(valid, mask)
    assert np.array_equal(decoded[mask], flow[mask]) and not decoded[~mask].any()


@needs_kitti
def test_reads_the_kitti_devkit_files():
    image = cv2.imread(str(KITTI / "image.png"))
    gt, gt_valid = read_flow(KITTI / "flow_gt.png")
    estimate, estimate_valid = read_flow(KITTI / "flow_est.png")
    assert gt.shape == estimate.shape == image.shape[:2] + (2,)
    assert 0.1 < gt_valid.mean() < 0.5 and estimate_valid.all()  # sparse ground truth, dense estimate
    assert epe(estimate, gt, gt_valid).mean() < epe(0 * gt, gt, gt_valid).mean()
    raw = cv2.imread(str(KITTI / "flow_gt.png"), cv2.IMREAD_UNCHANGED)
    assert encode_kitti_png_bytes(gt, gt_valid) == cv2.imencode(".png", raw)[1].tobytes()


@needs_middlebury
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_reads_middlebury_flo(sequence):
    frame, _, flow, valid = middlebury(sequence)
    assert flow.shape == frame.shape + (2,) and flow.dtype == np.float32
    assert valid.mean() > 0.9 and np.abs(flow[valid]).max() < 50 and not flow[~valid].any()


# Eq. 6


def reference_eq6(value, max_magnitude=56.0):
    return math.copysign(min(1.0, math.log(abs(value) + 1) / math.log(max_magnitude + 1)), value) if value else 0.0


@pytest.mark.parametrize("max_magnitude", [56.0, 10.0])
def test_normalize_flow_matches_eq6(max_magnitude):
    values = np.array([0.0, 0.3, -0.3, 1.0, -7.5, 20.0, 55.0, 56.0, -56.0, 57.0, -300.0], np.float32)
    expected = np.array([reference_eq6(float(v), max_magnitude) for v in values], np.float32)
    flow = np.stack([values, -values], axis=-1)
    expected_flow = np.stack([expected, -expected], axis=-1)
    np.testing.assert_allclose(normalize_flow(flow, max_magnitude), expected_flow, atol=1e-6)
    result = normalize_flow(torch.from_numpy(flow), max_magnitude)
    assert isinstance(result, torch.Tensor)
    np.testing.assert_allclose(result.numpy(), expected_flow, atol=1e-6)


def test_normalize_flow_sign_and_clamp():
    flow = random_flow(5, scale=300.0)
    normalised = normalize_flow(flow)
    assert normalised.dtype == np.float32
    np.testing.assert_array_equal(normalize_flow(-flow), -normalised)
    assert np.abs(normalised).max() <= 1.0
    assert np.all(np.abs(normalised[np.abs(flow) >= 56]) == 1.0)
    assert np.all(np.abs(normalised[np.abs(flow) < 56]) < 1.0)


# Estimators


@needs_middlebury
@pytest.mark.parametrize(
    "preset, published_rms", [("ultrafast", 0.86), ("fast", 0.74), ("medium", 0.49)]
)
def test_dis_meets_opencv_published_accuracy_on_rubberwhale(preset, published_rms):
    frame0, frame1, gt, valid = middlebury("RubberWhale")
    errors = epe(estimate_flow(frame0, frame1, "dis", preset=preset), gt, valid)
    assert np.sqrt(np.mean(errors**2)) <= published_rms + 0.02
    if preset == "medium":
        assert errors.mean() <= 0.25  # measured 0.223 with opencv-contrib 5.0


@needs_middlebury
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_dis_is_far_better_than_zero_flow_on_every_sequence(sequence):
    frame0, frame1, gt, valid = middlebury(sequence)
    flow = estimate_flow(frame0, frame1)  # default: dis medium
    assert epe(flow, gt, valid).mean() < 0.25 * epe(0 * gt, gt, valid).mean()


@needs_middlebury
@needs_contrib
def test_deepflow_meets_opencv_published_accuracy_on_rubberwhale():
    frame0, frame1, gt, valid = middlebury("RubberWhale")
    errors = epe(estimate_flow(frame0, frame1, "deepflow"), gt, valid)
    assert np.sqrt(np.mean(errors**2)) <= 0.35 + 0.02


@needs_middlebury
@pytest.mark.parametrize(
    "method", ["dis", "farneback", pytest.param("tvl1", marks=needs_contrib), pytest.param("deepflow", marks=needs_contrib)]
)
def test_estimator_beats_zero_flow_on_rubberwhale_in_rgb(method):
    folder = MIDDLEBURY / "RubberWhale"
    frame0, frame1 = (cv2.cvtColor(cv2.imread(str(folder / n)), cv2.COLOR_BGR2RGB) for n in ("frame10.png", "frame11.png"))
    gt, valid = read_flo(folder / "flow10.flo")
    flow = estimate_flow(frame0, frame1, method)
    assert flow.dtype == np.float32 and flow.shape == gt.shape
    assert epe(flow, gt, valid).mean() < 0.5 * epe(0 * gt, gt, valid).mean()


def test_unknown_method_lists_the_choices():
    frame = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(FLOW_METHODS)):
        estimate_flow(frame, frame, "lucas-kanade")


@pytest.mark.parametrize(
    "method, params, message",
    [("dis", {"preset": "slow"}, "preset"), ("farneback", {"windowSize": 3}, "windowSize"), ("deepflow", {"x": 1}, "no parameters")],
)
def test_bad_parameters_are_reported(method, params, message):
    frame = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match=message):
        estimate_flow(frame, frame, method, **params)


def test_frames_must_match():
    with pytest.raises(ValueError, match="equal shape"):
        estimate_flow(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))


def test_raft_without_weights_says_what_to_do(tmp_path):
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="raft needs weights=PATH"):
        estimate_flow(frame, frame, "raft")
    with pytest.raises(FileNotFoundError, match="raft weights file not found"):
        estimate_flow(frame, frame, "raft", weights=str(tmp_path / "missing.pth"))


def test_raft_runs_with_a_weights_file(tmp_path):
    """Random (untrained) raft_small weights: checks loading, padding to 128 and output shape."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    torch.save(raft_small().state_dict(), tmp_path / "raft_small.pth")
    frames = np.random.default_rng(0).integers(0, 256, (2, 45, 70, 3), dtype=np.uint8)
    flow = estimate_flow(frames[0], frames[1], "raft", weights=str(tmp_path / "raft_small.pth"), model="small", num_flow_updates=2)
    assert flow.shape == (45, 70, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
    with pytest.raises(ValueError, match="try model=small"):
        estimate_flow(frames[0], frames[1], "raft", weights=str(tmp_path / "raft_small.pth"))
