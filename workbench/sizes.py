"""Byte sizes: parsing what users type ('2GB') and printing what we measured, one way everywhere."""
from __future__ import annotations

import re


def parse_bytes(size, *, what: str = "size", error: type[Exception] = ValueError) -> int:
    """'2GB', '500MB', '1.5GiB', 10**9 -> bytes (GB = 10**9, GiB = 2**30); `error` is raised otherwise."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size < 0:
            raise error(f"{what}={size!r} is negative: use e.g. '2GB', '500MB' or a number of bytes.")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise error(f"{what}={size!r} is not a size: use e.g. '2GB', '500MB' or a number of bytes.")
    unit = (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2).upper() or "_")
    return int(float(m.group(1)) * unit)


def format_bytes(n: float | None) -> str:
    """Decimal units, 3 significant figures: 13.77 GB, 27.7 MB, 512 B; '-' for None."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n:.0f} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if n < 1000 * scale or unit == "TB":
            return f"{n / scale:.2f} {unit}" if unit in ("GB", "TB") else f"{n / scale:.1f} {unit}"
    raise AssertionError("unreachable")
