"""Which files clipengine reads, by name: kept apart from the decoders (and free of PIL and numpy) because a
folder walk, a query term and a caption folder decide by extension alone, and should cost nothing more. The
decoder has the last word: a file named like an image that is not one is skipped with the reason, and one
whose content is another supported format (a HEIC photo named .jpg) is read as what it is."""

from __future__ import annotations

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
# what a folder scan counts, and says it does not index yet
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts", ".wmv"})
