"""What job logic runs against: settings, a session factory and the output storage, and the
database's clock (leases, backoff and retry times are database time, never a host's clock)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory, utcnow
from service.settings import Settings
from service.storage import Storage, storage_from_url

HEAD_REVISION = "0004"


@dataclass
class Context:
    """What job logic needs: settings, a session factory and the output storage. `embedded` is
    the no-server mode, where the local user may read any local folder."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    embedded: bool = False

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session


def open_context(settings: Settings, *, embedded: bool = False, migrate: bool = True) -> Context:
    """Connect to the database (bringing an embedded SQLite database to the latest schema on
    first use) and open the output storage."""
    engine = make_engine(settings.database_url)
    if migrate and not _at_head(engine):
        from service.db import upgrade_database

        upgrade_database(settings.database_url)
    return Context(
        settings,
        session_factory(engine),
        storage_from_url(settings.storage_url, settings),
        embedded,
    )


def _at_head(engine: Any) -> bool:
    try:
        with engine.connect() as conn:
            return bool(
                conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                == HEAD_REVISION
            )
    except Exception:  # noqa: BLE001 - no table yet: not migrated
        return False


def db_now(session: Session) -> datetime:
    """The database's current time: every host compares leases against the same clock. SQLite
    (the embedded default) lives in this process, so its clock is this host's."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        now = session.scalar(select(func.statement_timestamp()))
        assert isinstance(now, datetime)
        return now
    return utcnow()
