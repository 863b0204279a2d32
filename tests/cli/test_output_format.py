"""`dpig submit --format`: the job's image format as one word."""

from __future__ import annotations

import pytest

from cli.output_format import parse_format


@pytest.mark.parametrize(
    ("text", "output"),
    [
        ("png", {"format": "png"}),
        ("png:1", {"format": "png", "compress_level": 1}),
        ("webp", {"format": "webp"}),
        ("WebP:80", {"format": "webp", "quality": 80}),
        ("webp:lossless", {"format": "webp", "lossless": True}),
        ("jpg:85", {"format": "jpeg", "quality": 85}),
    ],
)
def test_a_format_word_becomes_the_specs_output(text: str, output: dict[str, object]) -> None:
    assert parse_format(text) == output


@pytest.mark.parametrize(
    ("text", "message"),
    [("gif", "unknown format 'gif'"), ("png:high", "'high' is not a number")],
)
def test_a_bad_format_word_names_the_option(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--format: {message}"):
        parse_format(text)
