"""crossflow.data.video: frames read by seeking equal a sequential decode, on every real clip."""

import dataclasses

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
    # every clip is read by seeking: MP4 by its presentation stamps, AVI (stamps in decode order) by packet
    assert mode == "seek"
    assert (index.pts is None, index.decode_pts is not None) == ((path.suffix == ".avi",) * 2)


def test_avi_cuts_are_the_idr_and_i_vop_packets():
    """vtest.avi: H.264, an IDR every 250 frames; megamind_cg.avi: XVID, I-VOPs without leading B-VOPs."""
    assert video.scan_packets(str(VIDEOS / "vtest.avi")).cuts == ((0, 0), (250, 250), (500, 500), (750, 750))
    assert [j for j, _ in video.scan_packets(str(VIDEOS / "megamind_cg.avi")).cuts] == [0, 1, 98, 154, 200]


def encode_avi(path, codec, options, gop=30, num_frames=120):
    """An AVI of chaplin.mp4's first frames (quarter size), B-frames on, a keyframe every ``gop``."""
    with av.open(str(VIDEOS / "chaplin.mp4")) as clip:
        frames = [f.to_ndarray(format="bgr24")[::4, ::4].copy() for f, _ in zip(clip.decode(video=0), range(num_frames))]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, 2
        stream.codec_context.options = options
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    "codec, options, cuts",
    [
        ("libx264", {"x264-params": "keyint=30:min-keyint=30:scenecut=0:bframes=2"}, [0, 30, 60, 90]),
        ("libx264", {"x264-params": "keyint=30:min-keyint=30:scenecut=0:bframes=2:open-gop=1"}, [0]),
        ("mpeg4", {"flags": "+cgop", "sc_threshold": "1000000000"}, [0, 28, 56, 84, 112]),
        ("mpeg4", {}, [0]),
    ],
    ids=["h264-idr", "h264-open-gop", "mpeg4-closed-gov", "mpeg4-open-gov"],
)
def test_only_clean_cuts_are_seeked_to_in_decode_order(tmp_path, codec, options, cuts):
    """An open GOP's keyframes (non-IDR I, I-VOP before a B-VOP shown ahead of it) are no cuts: a decode
    from them would lose or misplace the frames shown before them. From every cut the frames are exact."""
    path = encode_avi(tmp_path / "clip.avi", codec, options)
    index = video.scan_packets(str(path))
    assert len(index.keyframes) == (4 if codec == "libx264" else 5)  # what the AVI index flags
    assert [j for j, _ in index.cuts] == cuts
    wanted = [3, 28, 29, 30, 31, 40, 41, 58, 60, 61, 75, 100, 110, 119]
    frames, mode = video.read_frames(str(path), wanted, index)
    reference = opencv_frames(path, max(wanted))
    assert mode == "seek" and sorted(frames) == wanted
    assert all(np.array_equal(frames[i], reference[i]) for i in wanted)


def test_a_seek_that_misses_its_cut_falls_back():
    """A cut claimed where there is no keyframe: the seek lands on the keyframe before it, whose stamp is
    not the one expected, so the frames come from the sequential pass, still exact."""
    path = VIDEOS / "vtest.avi"
    index = video.scan_packets(str(path))
    wrong = dataclasses.replace(index, cuts=((0, 0), (300, 300)))
    wanted = [310, 315]
    assert video._read_by_decode_order(str(path), wanted, wrong) is None
    frames, mode = video.read_frames(str(path), wanted, wrong)
    reference = opencv_frames(path, max(wanted))
    assert mode == "sequential" and all(np.array_equal(frames[i], reference[i]) for i in wanted)


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
