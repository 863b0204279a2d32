"""The encode pool: images are compressed and hashed in threads while the model runs the next
micro-batch, and come back in item order for the shard writer.

PIL releases the GIL while it compresses (measured in bench/encode_gil.py), so threads share the
CPU cores without pickling pixels into processes. The pool's size defaults to the container's CPU
quota (cgroup v2 `cpu.max`, then v1 `cpu.cfs_quota_us`), not the host's core count, which in a
container can be many times what it may use.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.encoding import encode_and_hash
from service.specs import OutputFormat

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs this container may use (quota ÷ period), or None where no quota is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 = none
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def default_workers(root: Path = CGROUP) -> int:
    """The CPU quota rounded up, at most the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = cgroup_cpu_quota(root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def shared_pool(workers: int | None) -> ThreadPoolExecutor | None:
    """One pool per size per process (a worker process reuses it for every chunk); None for
    `workers=0`, the serial path."""
    if workers == 0:
        return None
    size = workers or default_workers()
    with _pools_lock:
        if size not in _pools:
            _pools[size] = ThreadPoolExecutor(size, thread_name_prefix="dpig-encode")
        return _pools[size]


@dataclass
class Encoded:
    """One item ready for the shard: `data`/`sha256` for an image (and what `prepare` made of
    it), `error` for a failed item."""

    item: int
    meta: dict[str, Any]
    name: str | None = None
    data: bytes = b""
    sha256: str = ""
    error: str | None = None
    prepared: Any = None


Encoder = Callable[[npt.NDArray[np.uint8], OutputFormat], tuple[bytes, str]]
# (item, image bytes, meta, name, sha256) → anything: the shard's per-item work, in the pool too
Prepare = Callable[[int, bytes, dict[str, Any], str | None, str], Any]
Result = tuple[bytes, str, Any]


class OrderedEncoder:
    """Items go in with `put` or `put_error`; `ready` gives them back finished, in the same order.

    With no pool, each image is encoded in `put` (the serial path). With one, images go to it in
    groups of `group` (and whatever is put before `ready` is called): one task per image costs
    the model's thread a future and a wake-up each. `prepare`, if given, runs right after the
    encoder in the same thread, so the model's thread only orchestrates; its result is the
    item's `prepared`. At most `max_pending` images
    wait in the pool: past that, `ready` blocks on the oldest, calling `checkpoint` every
    `poll_seconds` meanwhile, so a slow encoder neither lets a lease lapse nor hides a cancel.
    `checkpoint` returns True to stop waiting (the caller stops).
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor | None,
        fmt: OutputFormat,
        *,
        max_pending: int,
        encoder: Encoder | None = None,
        prepare: Prepare | None = None,
        group: int = 1,
    ) -> None:
        self.pool, self.fmt, self.max_pending = pool, fmt, max_pending
        self.encoder = encoder or encode_and_hash
        self.prepare = prepare
        self.group = max(1, group)
        # (item, its group's future or None for an error, its place in the group), in item order
        self._queue: deque[tuple[Encoded, Future[list[Result]] | None, int]] = deque()
        self._open: list[tuple[Encoded, npt.NDArray[np.uint8]]] = []  # not yet in the pool
        self._images = 0

    def _task(
        self, item: int, pixels: npt.NDArray[np.uint8], meta: dict[str, Any], name: str | None
    ) -> Result:
        data, sha256 = self.encoder(pixels, self.fmt)
        prepared = None if self.prepare is None else self.prepare(item, data, meta, name, sha256)
        return data, sha256, prepared

    def _tasks(self, group: list[tuple[Encoded, npt.NDArray[np.uint8]]]) -> list[Result]:
        return [self._task(e.item, pixels, e.meta, e.name) for e, pixels in group]

    def _submit(self) -> None:
        """Send the open group to the pool (or, serial, encode it here)."""
        group, self._open = self._open, []
        if not group:
            return
        if self.pool is None:
            future: Future[list[Result]] = Future()
            future.set_result(self._tasks(group))
        else:
            future = self.pool.submit(self._tasks, group)
        self._queue.extend((entry, future, place) for place, (entry, _) in enumerate(group))

    def put(
        self, item: int, pixels: npt.NDArray[np.uint8], meta: dict[str, Any], name: str | None
    ) -> None:
        self._open.append((Encoded(item, meta, name), pixels))
        self._images += 1
        if self.pool is None or len(self._open) >= self.group:
            self._submit()

    def put_error(self, item: int, error: str, meta: dict[str, Any]) -> None:
        self._submit()  # the items before it keep their place
        self._queue.append((Encoded(item, meta, error=error), None, 0))

    def ready(
        self, *, drain: bool, checkpoint: Callable[[], bool], poll_seconds: float
    ) -> Iterator[Encoded]:
        """Finished items from the front. Waits for the oldest while more than `max_pending`
        images are queued (or, with `drain`, until none is); returns early if `checkpoint()`."""
        self._submit()
        while self._queue:
            entry, future, place = self._queue[0]
            must_wait = drain or self._images > self.max_pending
            if future is not None and not future.done():
                if not must_wait:
                    return
                try:
                    future.result(timeout=poll_seconds)
                except FutureTimeout:
                    if checkpoint():
                        return
                    continue
            self._queue.popleft()
            if future is not None:
                self._images -= 1
                entry.data, entry.sha256, entry.prepared = future.result()[place]
            yield entry

    def cancel(self) -> None:
        """Drop what is queued (the chunk stopped): pending encodes are not waited for."""
        for _entry, future, _place in self._queue:
            if future is not None:
                future.cancel()
        self._queue.clear()
        self._open.clear()
        self._images = 0
