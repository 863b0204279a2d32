"""Imported by the poison test's workers before the CLI runs (never by product code).

It wraps `service.executor.read_uri` so that reading a source whose file name contains "poison"
kills the process at once, as a native decoder crashing on a corrupt file would: the prefork child
dies mid-chunk with its lease held, every time the chunk is tried.
"""

from __future__ import annotations

import os
from typing import Any

import service.executor as executor

_read_uri = executor.read_uri


def _poisoned_read_uri(ctx: Any, uri: str, *, field: str = "uri") -> bytes:
    if "poison" in uri.rsplit("/", 1)[-1]:
        os._exit(137)
    return _read_uri(ctx, uri, field=field)


executor.read_uri = _poisoned_read_uri
