"""crossflow.data.video: frames read by seeking equal a sequential decode, on every real clip."""

import av
import cv2
import numpy as np
import pytest

from crossflow.data import video
from crossflow.data.prepare import sample_times

from .conftest import SHARED_DATA

VIDEOS = SHARED_DATA / "video"
CLIPS = sorted(VIDEOS.glob("*")) if VIDEOS.is_dir() else []
pytestmark = pytest.mark.skipif(not CLIPS, reason=f"real video clips not found at {VIDEOS}")


def opencv_frames(path, last):
    """Frames 0..last of one sequential OpenCV decode: the reference (and what prepare read before)."""
    capture, frames = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), []
    while len(frames) <= last:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def opencv_count(path):
    capture, count = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), 0
    while capture.grab():
        count += 1
    return count


def targets(name, num_frames, ends=True):
    """prepare's 8 pairs (gap 5) of the clip, with its first and last frame when ``ends``."""
    times = sample_times(name, num_frames, 8, 5, 0)
    return sorted({*times, *(t + 5 for t in times), *((0, num_frames - 1) if ends else ())})


@pytest.mark.parametrize("ends", [False, True], ids=["pairs", "pairs+ends"])
@pytest.mark.parametrize("path", CLIPS, ids=[p.name for p in CLIPS])
def test_frames_equal_a_sequential_decode(path, ends):
    index = video.scan_packets(str(path))
    assert index.num_frames == opencv_count(path)  # the packet count, not the header's
    wanted = targets(path.name, index.num_frames, ends)
    frames, mode = video.read_frames(str(path), wanted, index)
    reference = opencv_frames(path, max(wanted))
    assert sorted(frames) == wanted
    for i in wanted:
        assert frames[i].dtype == np.uint8 and np.array_equal(frames[i], reference[i]), (path.name, i, mode)
    # MP4 has presentation timestamps, so it is read by seeking; AVI stamps follow decode order
    assert mode == ("seek" if path.suffix == ".mp4" else "sequential")


def test_header_count_is_not_trusted():
    path = VIDEOS / "car_traffic_small.mp4"
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 922  # what the header (duration x fps) claims
    assert video.scan_packets(str(path)).num_frames == 917


@pytest.mark.parametrize("suffix", [".ts", ".mkv"])
def test_other_containers_equal_a_sequential_decode(tmp_path, suffix):
    """The same H.264 stream remuxed (no re-encoding): MPEG-TS has no index, MKV has cues."""
    source, copy = VIDEOS / "bikes.mp4", tmp_path / f"bikes{suffix}"
    with av.open(str(source)) as inp, av.open(str(copy), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    index = video.scan_packets(str(copy))
    wanted = targets(copy.name, index.num_frames)
    frames, _ = video.read_frames(str(copy), wanted, index)
    reference = video.read_sequential(str(copy), wanted)
    assert sorted(frames) == sorted(reference) == wanted
    assert all(np.array_equal(frames[i], reference[i]) for i in wanted)


def test_unreadable_files_name_the_problem(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(video.VideoUnreadable, match="cannot open as a video"):
        video.scan_packets(str(junk))
