"""Read chosen frames of a video by index, decoding only what they need (PyAV, one decoder thread).

Frame ``i`` is the ``i``-th frame in presentation order, as a sequential decode outputs them.

1. :func:`scan_packets` demuxes the video stream without decoding: one packet per frame, its
   timestamp (pts) and keyframe flag. The header's frame count is not trusted (it can say 922
   where 917 frames decode), the packet count is.
2. :func:`read_frames` walks the sorted targets: for each one whose frame lies past what is being
   decoded, it seeks to the keyframe at or before it and decodes forward, taking every target on
   the way; a target in the group of pictures already being decoded is reached without a seek;
   non-reference frames that are not targets are not decoded (H.264, MPEG-4 Part 2).
3. Where seeking cannot be verified (packets without pts, duplicate pts, stamps in decode order as
   in AVI, a first frame after the seek that is past the target or not a keyframe, decoded pts
   that do not increase), it decodes once from the start instead: ``mode`` says
   which way the frames were read.

Own code rather than OpenCV's ``CAP_PROP_POS_FRAMES`` or decord: those are not frame-exact
(opencv/opencv#9053, dmlc/decord#365); PyAV exposes packets, timestamps and seeks directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import av
import numpy as np

av.logging.set_level(av.logging.PANIC)  # broken files are reported as skip reasons, not on stderr


class VideoUnreadable(Exception):
    """The file cannot be opened or holds no video stream; the message says which."""


@dataclass(frozen=True)
class PacketIndex:
    """What a packet scan finds: ``pts[i]`` of frame i in presentation order (None where the
    container gives no usable timestamps) and the keyframes' pts (sorted)."""

    num_frames: int
    fps: float
    pts: tuple[int, ...] | None
    keyframes: tuple[int, ...]


def _open(path: str) -> av.container.InputContainer:
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise VideoUnreadable(f"cannot open as a video ({type(error).__name__})") from None
    if not container.streams.video:
        container.close()
        raise VideoUnreadable("cannot open as a video (no video stream)")
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "SLICE", 1  # one thread: workers parallelise
    return container


def scan_packets(path: str) -> PacketIndex:
    """Demux (no decoding) the first video stream: frame count, pts per frame, keyframes."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        pts, keyframes, missing = [], [], False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet
                    continue
                if packet.pts is None:
                    missing = True
                else:
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keyframes.append(packet.pts)
        except av.error.FFmpegError:
            pass  # a damaged tail: the frames before it still count
        num_frames = len(pts) if not missing else sum(1 for _ in _decode_all(path))
        # AVI stamps follow decode order, not presentation: a stream that may reorder frames (B-frames)
        # yet whose stamps never go back cannot be indexed by pts either
        decode_order = "avi" in container.format.name or (stream.codec_context.has_b_frames and pts == sorted(pts))
        usable = not missing and not decode_order and len(set(pts)) == len(pts) and bool(keyframes)
        return PacketIndex(num_frames, fps, tuple(sorted(pts)) if usable else None, tuple(sorted(keyframes)))
    finally:
        container.close()


def _decode_all(path: str):
    container = _open(path)
    try:
        yield from _frames(container)
    finally:
        container.close()


def _frames(container):
    """Decoded frames of the first video stream; stops quietly at a damaged packet."""
    try:
        yield from container.decode(container.streams.video[0])
    except av.error.FFmpegError:
        return


SKIP_NONREF_CODECS = ("h264", "mpeg4")  # non-reference frames are never referenced: skipping is exact


def _frames_skipping(container, wanted_pts: frozenset[int]):
    """Decoded frames from the current position, not decoding the non-reference frames that are
    not wanted (H.264, MPEG-4 Part 2; FFmpeg's skip_frame=NONREF, set packet by packet).
    Stops quietly at a damaged packet."""
    stream = container.streams.video[0]
    context, skipping = stream.codec_context, stream.codec_context.name in SKIP_NONREF_CODECS
    try:
        for packet in container.demux(stream):
            if skipping:
                context.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
            yield from context.decode(packet)
    except av.error.FFmpegError:
        return
    finally:
        context.skip_frame = "DEFAULT"


def _bgr(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="bgr24")


def read_sequential(path: str, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """``{i: BGR uint8 [H, W, 3]}`` for the wanted i, from one decode from the start up to the last."""
    wanted = set(indices)
    frames, last = {}, max(wanted, default=-1)
    container = _open(path)
    try:
        for index, frame in enumerate(_frames(container)):
            if index > last:
                break
            if index in wanted:
                frames[index] = _bgr(frame)
    finally:
        container.close()
    return frames


def read_frames(path: str, indices: Iterable[int], index: PacketIndex) -> tuple[dict[int, np.ndarray], str]:
    """(``{i: BGR uint8 [H, W, 3]}``, mode): the wanted frames, by seeking where it can be verified
    (mode ``"seek"``), else by one sequential pass (mode ``"sequential"``)."""
    wanted = sorted(set(i for i in indices if 0 <= i < index.num_frames))
    if index.pts is not None:
        frames = _read_seeking(path, wanted, index)
        if frames is not None:
            return frames, "seek"
    return read_sequential(path, wanted), "sequential"


def _read_seeking(path: str, wanted: list[int], index: PacketIndex) -> dict[int, np.ndarray] | None:
    """Seek-and-decode the wanted frames; None when a seek does not land on its keyframe."""
    frame_of = {pts: i for i, pts in enumerate(index.pts)}
    wanted_set, keyframe_set = frozenset(wanted), frozenset(index.keyframes)
    wanted_pts = frozenset(index.pts[i] for i in wanted)
    keyframes = np.asarray(index.keyframes)
    frames: dict[int, np.ndarray] = {}
    container = _open(path)
    try:
        stream = container.streams.video[0]
        position, decoder = -1, None  # index of the last frame decoded, and the running decoder
        for target in wanted:
            if target in frames:
                continue
            target_pts = index.pts[target]
            before = keyframes[keyframes <= target_pts]
            if not len(before):
                return None
            keyframe = int(before[-1])
            if decoder is None or frame_of[keyframe] > position or target <= position:
                # FFmpeg's backward seek to the target's pts lands on the keyframe at or before it (asking
                # for the keyframe's own pts can land one keyframe early in MP4 with an edit list)
                container.seek(target_pts, stream=stream, backward=True, any_frame=False)
                decoder, first = _frames_skipping(container, wanted_pts), True
            else:
                first = False
            for frame in decoder:
                if frame.pts is None or frame.pts not in frame_of:
                    return None
                if first:
                    if frame.pts not in keyframe_set or frame.pts > target_pts:
                        return None  # the seek landed past the keyframe, or not on one: not verifiable
                    first = False
                elif frame_of[frame.pts] <= position:
                    return None  # output pts not increasing: they are decode-order stamps (AVI), not presentation
                position = frame_of[frame.pts]
                if position in wanted_set:
                    frames.setdefault(position, _bgr(frame))
                if position >= target:
                    break
    finally:
        container.close()
    return frames
