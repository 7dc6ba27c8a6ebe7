"""Where a photo was taken, in words: GPS positions turned into a city, district, region and country, offline.

The names come from `reverse_geocode`, which ships GeoNames' 155,000 places of over 1,000 people (3.4 MB
installed; importing it with scipy and loading its k-d tree took 0.6 + 0.9 s here, so it is loaded only
when an `index` run meets positions it has not named yet). A position is named after the nearest of those
places, which is how Immich names its photos too: a photo by the Eiffel Tower is named after whichever
town's centre is nearest. Searching by place never loads it: `--place` matches the names stored in the
index, and `--near` is a distance computed in sqlite.

Names are matched as whole words, ignoring case and accents, against any of a file's names, so
`--place berlin` finds "Mitte, State of Berlin, Germany" and `--place ile-de-france` finds Île-de-France.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from clipengine.errors import BadInput

EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)
_UNITS_KM = {"km": 1.0, "m": 0.001, "mi": 1.609344}
_NUMBER = r"(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"  # as people write them, and as Python's repr does
_NEAR = re.compile(rf"\s*([+-]?{_NUMBER[1:-1]})\s*,\s*([+-]?{_NUMBER[1:-1]})\s*,\s*{_NUMBER}\s*([a-zA-Z]*)\s*")


@dataclass(frozen=True)
class Place:
    """The names of where a position is. `district` is GeoNames' second-level division (a county, a city's
    ward); any of them may be missing. The country code is kept, not matched: "de" is a word of Île-de-France."""

    city: str | None = None
    district: str | None = None
    region: str | None = None
    country: str | None = None
    country_code: str | None = None

    @property
    def label(self) -> str:
        """'Mitte, State of Berlin, Germany': the names from nearest to widest, without repeats."""
        names: list[str] = []
        for name in (self.city, self.district, self.region, self.country):
            if name and name not in names:
                names.append(name)
        return ", ".join(names)

    @property
    def words(self) -> str:
        """Every name as `place_words` writes it, each padded with spaces, for a LIKE '% word %' match."""
        return "|".join(f" {place_words(n)} " for n in (self.city, self.district, self.region, self.country) if n)


def place_words(name: str) -> str:
    """A name folded for matching: lower case, accents dropped, anything but letters and digits a single space."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return " ".join(re.findall(r"[a-z0-9]+", folded))


def name_places(positions: Sequence[tuple[float, float]]) -> list[Place]:
    """The place of each (latitude, longitude): the nearest GeoNames place of over 1,000 people."""
    if not positions:
        return []
    import reverse_geocode  # 1.5 s to import and load: only when there is something to name

    found = reverse_geocode.search([(float(lat), float(lon)) for lat, lon in positions])
    return [Place(r.get("city") or None, r.get("county") or None, r.get("state") or None, r.get("country") or None,
                  r.get("country_code") or None) for r in found]


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine) between two positions in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@dataclass(frozen=True)
class Near:
    """Within `radius_km` of a position."""

    latitude: float
    longitude: float
    radius_km: float

    def box(self) -> tuple[float, float, float, float]:
        """(lat_lo, lat_hi, lon_lo, lon_hi) holding the circle, for an indexed first cut (the whole longitude
        range near a pole or across the date line)."""
        dlat = math.degrees(self.radius_km / EARTH_RADIUS_KM)
        lat_lo, lat_hi = self.latitude - dlat, self.latitude + dlat
        if lat_lo <= -90 or lat_hi >= 90:
            return max(lat_lo, -90.0), min(lat_hi, 90.0), -180.0, 180.0
        dlon = math.degrees(math.asin(min(1.0, math.sin(self.radius_km / EARTH_RADIUS_KM)
                                              / math.cos(math.radians(self.latitude)))))
        lon_lo, lon_hi = self.longitude - dlon, self.longitude + dlon
        if lon_lo < -180 or lon_hi > 180:
            return lat_lo, lat_hi, -180.0, 180.0
        return lat_lo, lat_hi, lon_lo, lon_hi


def parse_near(text: str) -> Near:
    """'48.85,2.35,20km' (also m and mi) as a `Near`, or a one-line error: a radius needs its unit."""
    match = _NEAR.fullmatch(text)
    example = "give LAT,LON,RADIUS such as 48.85,2.35,20km (units km, m or mi)"
    if match is None:
        raise BadInput(f"--near {text!r}: {example}")
    lat, lon, radius, unit = float(match[1]), float(match[2]), float(match[3]), match[4].lower()
    if not unit:
        raise BadInput(f"--near {text!r}: the radius {match[3]} needs a unit: {radius:g}km, {radius:g}m or {radius:g}mi")
    if unit not in _UNITS_KM:
        raise BadInput(f"--near {text!r}: unknown unit {match[4]!r}: use km, m or mi")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise BadInput(f"--near {text!r}: latitude must be in [-90, 90] and longitude in [-180, 180]")
    if radius <= 0:
        raise BadInput(f"--near {text!r}: the radius must be more than 0")
    return Near(lat, lon, radius * _UNITS_KM[unit])
