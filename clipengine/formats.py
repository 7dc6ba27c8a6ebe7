"""Which files clipengine reads, by name: kept apart from the decoders (and free of PIL and numpy) because a
folder walk, a query term and a caption folder decide by extension alone, and should cost nothing more. The
decoder has the last word: a file named like an image that is not one is skipped with the reason, and one
whose content is another supported format (a HEIC photo named .jpg) is read as what it is."""

from __future__ import annotations

# what a folder scan and a caption folder count as images
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
)
# what a folder scan counts, and says it does not index yet
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts", ".wmv"})
