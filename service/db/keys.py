"""API keys: generated here, shown once, stored only as a prefix and a SHA-256 hash.

A plain SHA-256 (no salt, no stretching) is enough because the keys are 256-bit random tokens,
not passwords: there is nothing to brute-force, and an unsalted hash can be unique-indexed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX_LENGTH = 8


def hash_api_key(clear: str) -> str:
    """The stored form of a key: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(clear.encode()).hexdigest()


def key_prefix(clear: str) -> str:
    """The first characters of a key, stored in clear to find its row."""
    return clear[:PREFIX_LENGTH]


def new_api_key() -> tuple[str, str, str]:
    """A fresh key as `(clear, prefix, key_hash)`. Give `clear` to the user; store the others."""
    clear = secrets.token_urlsafe(32)
    return clear, key_prefix(clear), hash_api_key(clear)


def verify_api_key(clear: str, stored_hash: str) -> bool:
    """Whether `clear` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_api_key(clear), stored_hash.lower())
