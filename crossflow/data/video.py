"""Read chosen frames of a video by index, decoding only what they need (PyAV, one decoder thread).

Frame ``i`` is the ``i``-th frame in presentation order, as a sequential decode outputs them.

1. :func:`scan_packets` demuxes the video stream without decoding: one packet per frame, its
   timestamp (pts) and keyframe flag. The header's frame count is not trusted (it can say 922
   where 917 frames decode), the packet count is.
2. :func:`read_frames` walks the sorted targets: for each one whose frame lies past what is being
   decoded, it seeks to the keyframe at or before it and decodes forward, taking every target on
   the way; a target in the group of pictures already being decoded is reached without a seek;
   non-reference frames that are not targets are not decoded (H.264, MPEG-4 Part 2).
3. Containers whose stamps follow decode order (AVI) are indexed by packet: a seek to a keyframe
   that cuts the stream cleanly (an H.264 IDR, an MPEG-4 Part 2 I-VOP, any MJPEG frame), by its
   dts as stored, then counting the frames decoded from it (:func:`_read_by_decode_order`).
4. Where seeking cannot be verified (packets without pts, duplicate pts, a first frame after the
   seek that is past the target or not the keyframe expected, decoded pts that do not increase, a
   frame lost or foreign after a seek in decode order, another codec in decode order), it decodes
   once from the start instead: ``mode`` says which way the frames were read.

Own code rather than OpenCV's ``CAP_PROP_POS_FRAMES`` or decord: those are not frame-exact
(opencv/opencv#9053, dmlc/decord#365); PyAV exposes packets, timestamps and seeks directly.
"""

from __future__ import annotations

import re
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
    container gives no usable timestamps) and the keyframes' pts (sorted); for stamps in decode
    order (AVI), ``decode_pts[j]`` of packet j in decode order and ``cuts``, the (packet j, dts) of
    the keyframes that cut the stream cleanly (None and () where that path is not verifiable)."""

    num_frames: int
    fps: float
    pts: tuple[int, ...] | None
    keyframes: tuple[int, ...]
    decode_pts: tuple[int, ...] | None = None
    cuts: tuple[tuple[int, int], ...] = ()


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
        is_cut = _clean_cut_test(stream)
        pts, keyframes, cuts, missing = [], [], [], False
        pending = None  # (packet j, dts, bytes) of a keyframe whose test needs the packet after it
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet
                    continue
                if packet.pts is None:
                    missing = True
                    continue
                data = bytes(packet) if is_cut is not None and (packet.is_keyframe or pending) else b""
                if pending is not None:
                    cuts += [pending[:2]] if is_cut(pending[2], data) else []
                    pending = None
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
                    if is_cut is not None and packet.dts is not None:
                        pending = (len(pts), packet.dts, data)
                pts.append(packet.pts)
        except av.error.FFmpegError:
            pass  # a damaged tail: the frames before it still count
        if pending is not None and is_cut(pending[2], b""):
            cuts.append(pending[:2])
        num_frames = len(pts) if not missing else sum(1 for _ in _decode_all(path))
        # AVI stamps follow decode order, not presentation: a stream that may reorder frames (B-frames)
        # yet whose stamps never go back cannot be indexed by pts either
        decode_order = "avi" in container.format.name or (stream.codec_context.has_b_frames and pts == sorted(pts))
        distinct = not missing and len(set(pts)) == len(pts)
        usable = distinct and not decode_order and bool(keyframes)
        by_packet = distinct and decode_order and bool(cuts)
        return PacketIndex(
            num_frames, fps, tuple(sorted(pts)) if usable else None, tuple(sorted(keyframes)),
            tuple(pts) if by_packet else None, tuple(cuts) if by_packet else (),
        )  # fmt: skip
    finally:
        container.close()


def _clean_cut_test(stream):
    """For a codec where it can be told from a keyframe packet (and the packet after it), a test
    ``(bytes, next bytes) -> bool`` of whether decoding from that packet gives the frames of a
    decode from the start, from that frame on; else None.

    - H.264: an IDR access unit (nal_unit_type 5, ITU-T H.264 7.4.1.2.4): it ends the reference
      list and resets the picture order count, so no frame decoded before it is shown after it or
      referenced later; a frame shown before it but decoded after it would be decoded after the
      seek as well and come out first, which the reader's first-frame check refuses.
    - MPEG-4 Part 2: an I-VOP whose next VOP is not a B-VOP (ISO 14496-2 6.2.5, vop_coding_type):
      anchors are shown in decode order and a P-VOP references only the anchor before it; a B-VOP
      right after the I-VOP (open GOV) is shown before it and would be lost after a seek.
    - MJPEG: every frame is coded alone.
    Others (HEVC, MPEG-2, ...): None, read sequentially."""
    name = stream.codec_context.name
    if name == "mjpeg":
        return lambda data, following: True
    if name == "mpeg4":
        return _no_leading_b_vop
    if name != "h264":
        return None
    extradata = stream.codec_context.extradata or b""
    if extradata[:1] == b"\x01":  # avcC: each NAL unit prefixed by its big-endian length
        width = (extradata[4] & 3) + 1 if len(extradata) > 4 else 4
        return lambda data, following: _idr_length_prefixed(data, width)
    return lambda data, following: any(data[m.end()] & 0x1F == 5 for m in _START_CODE.finditer(data[:-1]))


_START_CODE = re.compile(b"\x00\x00\x01")  # Annex B; emulation prevention keeps it out of NAL payloads
_VOP_START = re.compile(b"\x00\x00\x01\xb6")  # MPEG-4 Part 2 VOP start code; 2 bits of coding type follow


def _idr_length_prefixed(data: bytes, width: int) -> bool:
    """Whether length-prefixed H.264 NAL units (ISO 14496-15) hold an IDR slice (type 5)."""
    at = 0
    while at + width < len(data):
        if data[at + width] & 0x1F == 5:
            return True
        at += width + int.from_bytes(data[at : at + width], "big")
    return False


def _no_leading_b_vop(data: bytes, following: bytes) -> bool:
    """Whether an MPEG-4 Part 2 packet holds an I-VOP (type 0) not followed by a B-VOP (type 2),
    looking into the next packet too (XVID packs a P- and a B-VOP in one)."""
    here, after = (_vop_types(chunk) for chunk in (data, following))
    if 0 not in here:
        return False
    later = here[here.index(0) + 1 :] + after
    return not later or later[0] != 2


def _vop_types(data: bytes) -> list[int]:
    return [data[m.end()] >> 6 for m in _VOP_START.finditer(data[:-1])]


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
    if index.pts is not None or index.decode_pts is not None:
        reader = _read_seeking if index.pts is not None else _read_by_decode_order
        frames = reader(path, wanted, index)
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


MAX_REORDER = 16  # frames past its target within which a run must close (H.264 buffers at most 16 for reordering)


def _read_by_decode_order(path: str, wanted: list[int], index: PacketIndex) -> dict[int, np.ndarray] | None:
    """Seek-and-decode the wanted frames of a stream stamped in decode order; None where not verified.

    A seek goes to the clean cut (packet k, see :func:`_clean_cut_test`) at or before the target, by
    its dts. Frames 0..k-1 are then exactly packets 0..k-1, so the n-th frame decoded from the cut
    is frame k + n: exactness rests on the cut. Each run is checked as a guard against a seek that
    lands elsewhere or a decoder that drops or repeats frames: the first frame carries packet k's
    stamp; each later one the stamp of a packet at or after k, none twice, none flagged corrupt; and
    a run ends only where the frames so far are exactly packets k..k+n-1, at most MAX_REORDER frames
    past its target."""
    packet_of = {stamp: j for j, stamp in enumerate(index.decode_pts)}
    cut_packets = np.asarray([j for j, _ in index.cuts])
    wanted_set, frames = frozenset(wanted), {}
    container = _open(path)
    try:
        stream = container.streams.video[0]
        position, decoder = -1, None  # frame index of the last frame decoded, and the running decoder
        for target in wanted:
            if target in frames:
                continue
            before = np.flatnonzero(cut_packets <= target)
            if not len(before):
                return None
            cut, dts = index.cuts[before[-1]]
            if decoder is None or cut > position:
                container.seek(dts, stream=stream, backward=True, any_frame=False)
                decoder, start, seen, last_packet = _frames(container), cut, set(), -1
            for frame in decoder:
                packet = packet_of.get(frame.pts, -1)
                if packet < start or frame.pts in seen or frame.is_corrupt or (not seen and packet != start):
                    return None
                seen.add(frame.pts)
                position, last_packet = start + len(seen) - 1, max(last_packet, packet)
                if position in wanted_set:
                    frames[position] = _bgr(frame)
                if position >= target and last_packet == position:  # frames so far: packets start..position
                    break
                if position > target + MAX_REORDER:
                    return None
            else:
                return None  # the stream ended before the target, or with a frame lost
    finally:
        container.close()
    return frames
