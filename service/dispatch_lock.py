"""One dispatcher at a time: a PostgreSQL session-level advisory lock, held on a connection of
its own for as long as the dispatcher runs. A second dispatcher (a rolling deploy, a replica too
many) stands by and takes over when the first exits or loses its connection, which releases the
lock on the server. SQLite (the embedded default) has a single process: the lock always holds."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Connection, text

from service.db import make_engine

log = logging.getLogger(__name__)
LOCK_KEY = 0x64706967_6469  # "dpig" "di": one key for every dispatcher of a database


class DispatcherLock:
    def __init__(self, database_url: str | SecretStr) -> None:
        self.engine: Any = make_engine(database_url)
        self.conn: Connection | None = None
        self.held = False

    @property
    def _sqlite(self) -> bool:
        return bool(self.engine.dialect.name == "sqlite")

    def acquire(self) -> bool:
        """Whether this process holds the lock now (taking it if it is free). Cheap enough to
        call before every tick: a holder only checks that its connection is alive."""
        if self._sqlite:
            return True
        try:
            if self.held and self.conn is not None:
                self.conn.execute(text("SELECT 1"))
                return True
            if self.conn is None:
                self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = self.conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY})
            self.held = bool(got.scalar())
        except Exception as exc:  # noqa: BLE001 - the connection (and so the lock) is gone
            log.warning("dispatcher lock: %s", exc)
            self._drop()
        return self.held

    def release(self) -> None:
        if self.conn is not None and self.held:
            try:
                self.conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            except Exception as exc:  # noqa: BLE001 - closing the connection releases it too
                log.warning("dispatcher lock release: %s", exc)
        self._drop()

    def _drop(self) -> None:
        self.held = False
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001, S110 - a dead connection may fail to close
                pass
            self.conn = None

    def __enter__(self) -> DispatcherLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        self.engine.dispose()
