"""`--format` for `dpig submit`: the job's image format as one word, e.g. png, png:1, webp,
webp:80, webp:lossless, jpeg, jpeg:85 (the `output` field of the spec, docs/api.md)."""

from __future__ import annotations

from typing import Any

FORMAT_HELP = (
    "Image format: png[:LEVEL 0-9] (default png:6), webp[:QUALITY 1-100 | :lossless] "
    "(default webp:90) or jpeg[:QUALITY] (default jpeg:90)."
)


def parse_format(text: str) -> dict[str, Any]:
    """'webp:80' → {"format": "webp", "quality": 80}. Ranges are checked by the spec itself;
    here only the shape, with a message that names --format."""
    name, _, option = text.strip().lower().partition(":")
    if name == "jpg":
        name = "jpeg"
    if name not in ("png", "webp", "jpeg"):
        raise ValueError(f"--format: unknown format {text!r} (png, webp or jpeg)")
    out: dict[str, Any] = {"format": name}
    if not option:
        return out
    if name == "webp" and option == "lossless":
        return out | {"lossless": True}
    if not option.isdigit():
        raise ValueError(f"--format: {option!r} is not a number in {text!r}")
    return out | {"compress_level" if name == "png" else "quality": int(option)}
