"""The worker child's probe files: a heartbeat (liveness) and a ready file (model loaded)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("celery")

from service.settings import get_settings  # noqa: E402
from workers import tasks  # noqa: E402

PROBE_VARS = (
    "DPIG_WORKER_HEARTBEAT_FILE",
    "DPIG_WORKER_HEARTBEAT_S",
    "DPIG_WORKER_READY_FILE",
    "DPIG_PRELOAD_MODEL",
    "DPIG_MODEL",
)


@pytest.fixture
def child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A worker child's environment (SQLite, local outputs), with fresh state and no probes."""
    for name in PROBE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPIG_DATABASE_URL", f"sqlite:///{tmp_path}/dpig.db")
    monkeypatch.setenv("DPIG_DEVICE", "cpu")
    monkeypatch.setenv("DPIG_BATCH_SIZE", "4")
    get_settings.cache_clear()
    tasks._state.clear()
    tasks._probes_stop.clear()
    yield tmp_path
    tasks._probes_stop.set()
    tasks._state.clear()
    get_settings.cache_clear()


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_no_probe_variables_start_nothing(child: Path) -> None:
    assert tasks.start_probes() == []


def test_heartbeat_file_is_touched_repeatedly(child: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    beat = child / "probes" / "heartbeat"
    monkeypatch.setenv("DPIG_WORKER_HEARTBEAT_FILE", str(beat))
    monkeypatch.setenv("DPIG_WORKER_HEARTBEAT_S", "0.05")
    (thread,) = tasks.start_probes()
    assert thread.daemon
    assert _wait_for(beat.exists)
    first = beat.stat().st_mtime_ns
    assert _wait_for(lambda: beat.stat().st_mtime_ns > first), "heartbeat not renewed"
    tasks._probes_stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_ready_file_is_written_after_the_default_model_loads(
    child: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = child / "probes" / "ready"
    monkeypatch.setenv("DPIG_WORKER_READY_FILE", str(ready))
    monkeypatch.setenv("DPIG_PRELOAD_MODEL", "1")
    (thread,) = tasks.start_probes()
    thread.join(timeout=120)
    assert ready.exists()
    pipes = tasks._state["pipes"]
    assert "default" in pipes.load_seconds  # loaded before the file was written
    ctx, same = tasks._worker()  # the first chunk reuses the preloaded model
    assert same is pipes


def test_ready_file_without_preload_is_written_at_once(
    child: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = child / "ready"
    monkeypatch.setenv("DPIG_WORKER_READY_FILE", str(ready))
    (thread,) = tasks.start_probes()
    thread.join(timeout=10)
    assert ready.exists()
    assert "pipes" not in tasks._state  # nothing loaded: the model loads with the first chunk


def test_failed_preload_leaves_the_worker_unready(
    child: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = child / "ready"
    empty = child / "not-a-model"
    empty.mkdir()
    monkeypatch.setenv("DPIG_WORKER_READY_FILE", str(ready))
    monkeypatch.setenv("DPIG_PRELOAD_MODEL", "1")
    monkeypatch.setenv("DPIG_MODEL", str(empty))
    (thread,) = tasks.start_probes()
    thread.join(timeout=60)
    assert not ready.exists()


def test_shutdown_removes_the_ready_file(child: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ready = child / "ready"
    ready.touch()
    stop = child / "stop"
    monkeypatch.setenv("DPIG_WORKER_READY_FILE", str(ready))
    monkeypatch.setattr(tasks, "STOP_FILE", stop)
    tasks._shutting_down()
    assert stop.exists()
    assert not ready.exists()
