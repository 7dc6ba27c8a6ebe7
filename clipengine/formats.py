"""Which files clipengine reads, by name, and how it samples a video: kept apart from the decoders (and free of PIL and numpy) because a
folder walk, a query term and a caption folder decide by extension alone, and should cost nothing more. The
decoder has the last word: a file named like an image that is not one is skipped with the reason, and one
whose content is another supported format (a HEIC photo named .jpg) is read as what it is."""

from __future__ import annotations

import os
from dataclasses import dataclass

# camera RAW files, decoded by LibRaw (rawpy): from their embedded preview when it is large enough
RAW_EXTENSIONS = frozenset({
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".rwl",
    ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".dcr", ".mrw", ".iiq", ".mos",
})
# phone formats: HEIC/HEIF (pillow-heif), AVIF (Pillow itself), JPEG XL (pillow-jxl-plugin)
PHONE_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif", ".jxl"})
# what a folder scan and a caption folder count as images
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
) | PHONE_EXTENSIONS | RAW_EXTENSIONS
# videos, indexed by their frames (clipengine.video) unless `index --no-video`
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts", ".wmv"})


def is_video_name(path: str | os.PathLike) -> bool:
    """Whether a file is read as a video: by its extension, as a folder walk decides."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoSampling:
    """How a video is turned into frames (`clipengine.video`); `clipengine index --video-*` set some of these."""

    interval: float = 1.0  # seconds between looks
    max_looks: int = 240  # looks per video at most: a longer video is looked at every duration/max_looks seconds
    max_frames: int = 16  # frames kept (embedded) per video at most
    scene_change: float = 0.08  # how different (mean absolute difference of signatures, 0..1) a kept look must be
    budget_seconds: float = 60.0  # wall time one video may take to look at

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.max_looks >= 1 and self.max_frames >= 1 and self.budget_seconds > 0
                and 0 <= self.scene_change <= 1):
            raise ValueError("video sampling needs interval > 0, max_looks >= 1, max_frames >= 1, budget > 0 "
                             "and scene_change in [0, 1]")


DEFAULT_SAMPLING = VideoSampling()
