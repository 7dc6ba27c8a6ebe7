"""What a photo or a video says about itself: when it was taken, with what, and where.

Read from what the decoders already parse, never by a reader of our own: Pillow's EXIF (which pillow-heif
fills for HEIC, and which JPEG, TIFF, WebP, PNG and AVIF carry), PyAV's container metadata for videos
(MP4/MOV `creation_time`, the ISO 6709 `location` phones write, QuickTime's and Android's make and model).

Cameras write nonsense often enough that every field is checked, and a bad one is dropped, not guessed at:
  - a taken time of `0000:00:00 00:00:00`, an impossible date, or one later than tomorrow (a camera whose
    clock was never set) is no time; the time zone is EXIF's OffsetTimeOriginal when the camera wrote one,
    and the time is otherwise local to wherever it was taken, which `taken_zone` says ("" for unknown);
  - a GPS position outside [-90, 90] x [-180, 180], or exactly (0, 0) (a receiver without a fix), is no place;
  - text fields are stripped of the NUL padding cameras leave, and dropped when empty.
Where no taken time can be read, the caller falls back to the file's modification time and records that
it did (`taken_source`).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, DATETIME, OFFSET_TIME = 0x010F, 0x0110, 0x0132, 0x9010
DATETIME_ORIGINAL, DATETIME_DIGITIZED, OFFSET_TIME_ORIGINAL, LENS_MODEL = 0x9003, 0x9004, 0x9011, 0xA434
_EXIF_TIME = re.compile(r"\s*(\d{4}):(\d\d):(\d\d)[ T](\d\d):(\d\d):(\d\d)")
_OFFSET = re.compile(r"\s*([+-])(\d\d):?(\d\d)\s*$")
_ISO6709 = re.compile(r"([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)?")


@dataclass(frozen=True)
class MediaInfo:
    """The metadata of one file. `taken` is ISO 8601 ("2023-07-14T18:03:22+02:00", or without an offset when
    the file gives no time zone); `taken_source` says where it came from: "exif", "exif-digitized",
    "exif-modified", "video", or "" when the file had no usable time."""

    taken: str | None = None
    taken_source: str = ""
    make: str | None = None
    model: str | None = None
    lens: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    altitude: float | None = None

    @property
    def camera(self) -> str | None:
        """'Google Pixel 7': the model, with the make in front unless the model already names it."""
        if not self.model:
            return self.make
        if self.make and not self.model.lower().startswith(self.make.split()[0].lower()):
            return f"{self.make} {self.model}"
        return self.model


NO_METADATA = MediaInfo()


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def parse_exif_time(value, offset=None, *, now: dt.datetime | None = None) -> str | None:
    """An EXIF date ('2023:07:14 18:03:22') and its offset ('+02:00') as ISO 8601, or None when it is not a
    real moment: zeros, an impossible date, or later than tomorrow."""
    text = _text(value)
    match = _EXIF_TIME.match(text or "")
    if match is None:
        return None
    try:
        year, month, day, hour, minute, second = (int(g) for g in match.groups())
        moment = dt.datetime(year, month, day, hour, minute, second)
    except ValueError:  # 0000:00:00, a 31st of February
        return None
    zone = _OFFSET.match(_text(offset) or "")
    if zone:
        sign = 1 if zone.group(1) == "+" else -1
        minutes = sign * (int(zone.group(2)) * 60 + int(zone.group(3)))
        if abs(minutes) <= 14 * 60:
            moment = moment.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
    latest = (now or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(days=1)
    compared = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    if compared > latest or moment.year < 1826:  # the future; before the first photograph
        return None
    return moment.isoformat()


def _position(latitude: float | None, longitude: float | None) -> tuple[float | None, float | None]:
    if latitude is None or longitude is None:
        return None, None
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180) or (latitude == 0 and longitude == 0):
        return None, None
    return round(latitude, 7), round(longitude, 7)


def _degrees(value, ref) -> float | None:
    """EXIF's (degrees, minutes, seconds) rationals and its N/S or E/W reference as signed degrees."""
    try:
        parts = [float(v) for v in value]
        degrees = parts[0] + (parts[1] / 60 if len(parts) > 1 else 0) + (parts[2] / 3600 if len(parts) > 2 else 0)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if degrees != degrees:  # NaN, from a rational with a zero denominator
        return None
    return -degrees if (_text(ref) or "").upper() in ("S", "W") else degrees


def from_exif(exif, *, now: dt.datetime | None = None) -> MediaInfo:
    """The metadata in a Pillow `Image.Exif` (what `Image.getexif()` returns, for any format Pillow reads)."""
    try:
        details = exif.get_ifd(EXIF_IFD)
        gps = exif.get_ifd(GPS_IFD)
    except Exception:  # a damaged sub-directory: what the main one says still counts
        details, gps = {}, {}
    taken, source = None, ""
    for tag, offset, where, name in ((DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL, details, "exif"),
                                     (DATETIME_DIGITIZED, OFFSET_TIME_ORIGINAL, details, "exif-digitized"),
                                     (DATETIME, OFFSET_TIME, exif, "exif-modified")):
        taken = parse_exif_time(where.get(tag), details.get(offset), now=now)
        if taken:
            source = name
            break
    latitude, longitude = _position(_degrees(gps.get(2), gps.get(1)), _degrees(gps.get(4), gps.get(3)))
    altitude = None
    if latitude is not None and gps.get(6) is not None:
        try:
            altitude = float(gps[6]) * (-1 if gps.get(5) in (b"\x01", 1) else 1)
        except (TypeError, ValueError, ZeroDivisionError):
            altitude = None
        if altitude is not None and not -500 <= altitude <= 12_000:  # below the Dead Sea, above a jet
            altitude = None
    return MediaInfo(taken, source, _text(exif.get(MAKE)), _text(exif.get(MODEL)), _text(details.get(LENS_MODEL)),
                     latitude, longitude, None if altitude is None else round(altitude, 1))


def from_video(metadata: dict, *, now: dt.datetime | None = None) -> MediaInfo:
    """The metadata in a video container's tags (PyAV's `container.metadata`)."""
    taken = None
    created = _text(metadata.get("creation_time") or metadata.get("com.apple.quicktime.creationdate"))
    if created:
        try:
            moment = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        latest = (now or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(days=1)
        aware = moment and (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc))
        # a muxer that knows no time writes its epoch, 1904 or 1970
        if aware and aware.year > 1970 and aware <= latest:
            taken = moment.replace(microsecond=0).isoformat()  # type: ignore[union-attr]
    latitude = longitude = altitude = None
    place = _text(metadata.get("location") or metadata.get("com.apple.quicktime.location.ISO6709"))
    match = _ISO6709.match(place or "")
    if match:
        latitude, longitude = _position(float(match.group(1)), float(match.group(2)))
        if latitude is not None and match.group(3):
            altitude = round(float(match.group(3)), 1)
    make = _text(metadata.get("com.apple.quicktime.make") or metadata.get("com.android.manufacturer")
                 or metadata.get("make"))
    model = _text(metadata.get("com.apple.quicktime.model") or metadata.get("com.android.model")
                  or metadata.get("model"))
    return MediaInfo(taken, "video" if taken else "", make, model, None, latitude, longitude, altitude)
