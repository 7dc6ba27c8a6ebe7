"""A video as a handful of frames worth searching, each with its moment, or in a few words why it was skipped.

Phone libraries are full of videos, and one frame cannot stand for one: Immich embeds a single frame, so a
clip with a black intro is a black picture, and every such clip is a "duplicate" of every other. Here a
video is *looked at* every `interval` seconds (more sparsely in a long one: never more than `max_looks`
times), each look decoding only the keyframe at or before its moment, reached by seeking, so a 4-hour video
costs a few hundred keyframe decodes rather than hundreds of thousands of frames. Of the looks, black and
near-constant ones are dropped, and a look is kept when it differs enough from the last one kept (a scene
change); at most `max_frames` are kept, the biggest changes first. Everything goes through PyAV (FFmpeg
inside its wheel). Nothing here raises on a bad file: `open_video` returns `DecodedVideo` or `Skipped`.

A video's time is bounded twice: by the number of looks, and by `budget_seconds` of wall time, after which
it is represented by what was seen so far. A file that changes while it is read (still being recorded or
copied) is skipped, and indexed by the next run, which sees it changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clipengine.formats import DEFAULT_SAMPLING, VideoSampling, is_video_name
from clipengine.images import Decoded, Skipped, header_metadata, megapixels, open_image
from clipengine.metadata import NO_METADATA, MediaInfo, from_video
from clipengine.sizes import DEFAULT_MAX_PIXELS

NEAR_CONSTANT = 0.03  # a look whose 16x16 signature has a smaller standard deviation (of 1) is black or a flat colour
SIGNATURE_SIDE = 16
# PyAV's rotation (counter-clockwise degrees, from the display matrix) -> the turn that shows the frame upright
_TURN = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Frame:
    seconds: float  # from the start of the video, as a player counts (the media fragment #t=)
    image: Image.Image  # RGB, upright, reduced so that its shorter side is about the model's input size


@dataclass(frozen=True)
class DecodedVideo:
    frames: list[Frame]  # in time order, at least one
    width: int  # as a player shows it (after rotation)
    height: int
    duration: float  # seconds (0 when the file does not say)
    looks: int  # frames decoded to choose from
    seen_seconds: float = 0.0  # how far into the video the looks reached (less than duration if the budget ran out)
    metadata: MediaInfo = NO_METADATA  # when, with what and where, from its container's tags (clipengine.metadata)
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent: open, seek+decode, convert, choose


def open_video(path: str | os.PathLike, sampling: VideoSampling = DEFAULT_SAMPLING, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = 224) -> DecodedVideo | Skipped:
    """Decode the frames that stand for a video, or say why it cannot be indexed (see the module docstring).
    `draft_size`: frames come out with their shorter side this long (None: full size)."""
    try:
        import av
    except ImportError:
        return Skipped("videos need their decoder: pip install av")
    path = os.fspath(path)
    try:
        before = os.stat(path)
    except OSError as e:
        return Skipped(f"cannot read file: {e.strerror or e}")
    if before.st_size == 0:
        return Skipped("empty file")
    looker = _Looker(sampling, draft_size)
    try:
        with av.open(path, metadata_errors="ignore") as container:
            looker.timings["open"] = time.perf_counter() - looker.started
            if not container.streams.video:
                return Skipped("no video stream (audio only?)")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                return Skipped(f"too large to decode safely: {width}x{height} ({megapixels(width * height)} > "
                               f"{megapixels(max_pixels)} cap, --max-pixels)")
            duration = _duration(container, stream)
            metadata = from_video(dict(container.metadata))
            looker.look(container, stream, duration)
    except av.error.FFmpegError as e:
        return Skipped(_describe(e, path))
    except (OSError, ValueError, MemoryError) as e:
        return Skipped(f"not a readable video ({type(e).__name__}: {e})")
    try:
        after = os.stat(path)
    except OSError:
        return Skipped("file disappeared while it was read")
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return Skipped("changed while it was read (still being recorded or copied?): index again when it is complete")
    looks = sorted(looker.looks, key=lambda look: look[0])
    if not looks:
        return Skipped("no frame could be decoded")
    tic = time.perf_counter()
    chosen = choose_frames([signature for _, signature, _ in looks], sampling)
    looker.timings["choose"] += time.perf_counter() - tic
    if not chosen:
        return Skipped(f"every frame looked at is black or a single colour ({len(looks)} looked at)")
    if looker.rotation in (90, 270):
        width, height = height, width
    frames = [Frame(looks[i][0], looks[i][2]) for i in chosen]
    return DecodedVideo(frames, width, height, duration or 0.0, len(looks), looker.seen, metadata, looker.timings)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return None


def _start(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0


def _describe(error: Exception, path: str) -> str:
    if _mp4_without_index(path):
        return "not a complete video (its index is missing: still being recorded or copied?)"
    return f"not a readable video ({getattr(error, 'strerror', None) or error})"


def _mp4_without_index(path: str) -> bool:
    """Whether an MP4/MOV file has its header box (ftyp) but not its index (moov): a recording not yet finished,
    or a copy cut short. (FFmpeg only says "invalid data".)"""
    boxes: set[bytes] = set()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            at = 0
            while at + 8 <= size and len(boxes) < 64:
                f.seek(at)
                header = f.read(16)
                length, kind = int.from_bytes(header[:4], "big"), header[4:8]
                if length == 1 and len(header) == 16:
                    length = int.from_bytes(header[8:16], "big")
                boxes.add(kind)
                if length < 8:
                    break
                at += length
    except OSError:
        return False
    return b"ftyp" in boxes and b"moov" not in boxes


def look_times(duration: float, sampling: VideoSampling) -> list[float]:
    """The moments a video of `duration` seconds is looked at: every `interval` seconds, but never more than
    `max_looks` of them, each in the middle of its stretch of the video."""
    count = max(1, min(sampling.max_looks, int(duration / sampling.interval)))
    spacing = duration / count
    return [spacing * (i + 0.5) for i in range(count)]


class _Looker:
    """Decodes a video's looks: (seconds, signature, image), with where the time went, bounded by the budget."""

    def __init__(self, sampling: VideoSampling, draft_size: int | None):
        self.sampling = sampling
        self.draft_size = draft_size
        self.looks: list[tuple[float, np.ndarray, Image.Image]] = []
        self.rotation = 0
        self.seen = 0.0
        self.start = 0.0
        self.started = time.perf_counter()
        self.timings = dict.fromkeys(("open", "decode", "convert", "choose"), 0.0)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.sampling.budget_seconds

    def add(self, frame, at: float | None = None) -> None:
        """Look at a decoded frame, shown at `at` seconds (by default, its own time)."""
        tic = time.perf_counter()
        self.rotation = int(frame.rotation or 0) % 360
        image = _upright(frame, self.draft_size, self.rotation)
        seconds = max(0.0, (float(frame.time or 0.0) if at is None else at) - self.start)
        self.looks.append((seconds, _signature(image), image))
        self.seen = max(self.seen, seconds)
        self.timings["convert"] += time.perf_counter() - tic

    def look(self, container, stream, duration: float | None) -> None:
        self.start = _start(stream)
        if not duration:  # no duration (a stream-like file, a recording cut short): decode it in order
            self._in_order(container, stream, self.sampling.interval)
            return
        times = look_times(duration, self.sampling)
        self._keyframes_at(container, stream, times)
        if len(self.looks) >= len(times) // 2 or self.over_budget():
            return
        # keyframes too far apart (screen recordings, some cameras) to look often enough: decode the frames in order
        keyed, self.looks = self.looks, []
        stream.codec_context.skip_frame = "DEFAULT"
        container.seek(int(self.start / stream.time_base), stream=stream, backward=True)
        self._in_order(container, stream, duration / len(times))
        if len(self.looks) < len(keyed):
            self.looks = keyed

    def _keyframes_at(self, container, stream, times: list[float]) -> None:
        """For each moment, the keyframe at or before it (once each), reached by seeking: only keyframes decode.
        A decoder holds a frame back until later ones arrive (to reorder them), which with non-keyframes skipped
        means until the next keyframe: it is drained at once instead, which made a look 3x cheaper (1280x720
        H.264, a keyframe a second: 11 ms against 32)."""
        import av

        stream.codec_context.skip_frame = "NONKEY"
        seen: set[int] = set()
        for t in times:
            if self.over_budget():
                return
            tic = time.perf_counter()
            found = None
            try:
                container.seek(int((self.start + t) / stream.time_base), stream=stream, backward=True)
                for packet in container.demux(stream):
                    try:
                        frames = packet.decode()
                        if not frames and packet.is_keyframe:
                            frames = stream.codec_context.decode(None)
                    except av.error.InvalidDataError:
                        continue
                    if frames:
                        pts = frames[0].pts if frames[0].pts is not None else packet.pts
                        found = (frames[0], pts)
                        break
            except av.error.FFmpegError:
                found = None
            self.timings["decode"] += time.perf_counter() - tic
            if found is not None and found[1] is not None and found[1] not in seen:
                seen.add(found[1])
                self.add(found[0], float(found[1] * stream.time_base))

    def _in_order(self, container, stream, every: float) -> None:
        """Decode every frame from where the container is and look at one each `every` seconds; past
        `max_looks`, every other look is dropped and the spacing doubled, so the looks stay bounded."""
        next_at = every / 2
        tic = time.perf_counter()
        for frame in _decoded(container, stream):
            self.timings["decode"] += time.perf_counter() - tic
            at = float(frame.time or 0.0) - self.start
            if at >= next_at:
                self.add(frame)
                next_at += every * (int((at - next_at) / every) + 1)
                if len(self.looks) > self.sampling.max_looks:
                    self.looks = self.looks[::2]
                    every *= 2
            if self.over_budget():
                return
            tic = time.perf_counter()


def _decoded(container, stream) -> Iterator:
    """Frames from where the container is, stepping over packets that do not decode (a damaged stretch)."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _upright(frame, draft_size: int | None, rotation: int) -> Image.Image:
    """The frame as RGB, its shorter side reduced to `draft_size` by FFmpeg's area filter, turned upright."""
    width, height = frame.width, frame.height
    if draft_size and min(width, height) > draft_size:
        scale = draft_size / min(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    image = frame.to_image(width=width, height=height, interpolation="AREA")
    return image.transpose(_TURN[rotation]) if rotation in _TURN else image


def _signature(image: Image.Image) -> np.ndarray:
    """A look reduced to 16x16 colours in [0, 1]: enough to tell a scene change, or a black frame."""
    small = image.resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def choose_frames(signatures: list[np.ndarray], sampling: VideoSampling) -> list[int]:
    """Which looks (indices, in time order) stand for the video: none that is black or near-constant; the first
    of the others, then each that differs from the last kept by at least `scene_change`. Past `max_frames`, the
    first and the biggest changes are kept: a cut between scenes changes more than a camera's pan, so a video
    with more changes than frames loses pans before it loses scenes. Empty when every look is near-constant."""
    lively = [i for i, s in enumerate(signatures) if float(s.mean(axis=2).std()) >= NEAR_CONSTANT]
    if not lively:
        return []
    kept, change = [lively[0]], [np.inf]
    for i in lively[1:]:
        difference = float(np.abs(signatures[i] - signatures[kept[-1]]).mean())
        if difference >= sampling.scene_change:
            kept.append(i)
            change.append(difference)
    if len(kept) > sampling.max_frames:
        biggest = np.argsort(-np.asarray(change), kind="stable")[:sampling.max_frames]
        kept = [kept[j] for j in sorted(biggest.tolist())]
    return kept


def still_of(path: str | os.PathLike, seconds: float | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft_size: int | None = 512) -> Decoded | Skipped:
    """What a file looks like: an image decoded (`open_image`), or a video's frame at `seconds` (its first
    frame when None): the picture a thumbnail or a terminal preview of a search hit shows."""
    if not is_video_name(path):
        return open_image(path, max_pixels=max_pixels, draft_size=draft_size)
    return frame_at(path, seconds or 0.0, max_pixels=max_pixels, draft_size=draft_size)


def frame_at(path: str | os.PathLike, seconds: float, *, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft_size: int | None = 512) -> Decoded | Skipped:
    """The frame shown at `seconds` into a video, upright, with the video's size as a player shows it."""
    try:
        import av
    except ImportError:
        return Skipped("videos need their decoder: pip install av")
    try:
        with av.open(os.fspath(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                return Skipped("no video stream (audio only?)")
            stream = container.streams.video[0]
            if stream.codec_context.width * stream.codec_context.height > max_pixels:
                return Skipped("too large to decode safely (--max-pixels)")
            start = _start(stream)
            container.seek(int((start + max(0.0, seconds)) / stream.time_base), stream=stream, backward=True)
            found = None
            for frame in _decoded(container, stream):
                found = frame
                if float(frame.time or 0.0) - start >= seconds:
                    break
            if found is None:
                return Skipped("no frame could be decoded")
            rotation = int(found.rotation or 0) % 360
            width, height = (found.height, found.width) if rotation in (90, 270) else (found.width, found.height)
            return Decoded(_upright(found, draft_size, rotation), width, height)
    except av.error.FFmpegError as e:
        return Skipped(_describe(e, os.fspath(path)))
    except (OSError, ValueError, MemoryError) as e:
        return Skipped(f"not a readable video ({type(e).__name__}: {e})")


def metadata_of(path: str | os.PathLike) -> tuple[MediaInfo, float | None]:
    """What a file's header says of it, without decoding a pixel: an image's EXIF, a video's tags and duration
    (for an index made before metadata was read: `clipengine.index.pipeline` fills it in)."""
    path = os.fspath(path)
    if not is_video_name(path):
        return header_metadata(path), None
    try:
        import av

        with av.open(path, metadata_errors="ignore") as container:
            duration = _duration(container, container.streams.video[0]) if container.streams.video else None
            return from_video(dict(container.metadata)), duration
    except Exception:  # unreadable now: nothing is known, and the file stays as indexed
        return NO_METADATA, None
