"""Engines, sessions and schema upgrades for PostgreSQL and SQLite."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 30_000


def migrations_dir() -> Path:
    """The Alembic scripts folder: beside the `service` package, in a checkout or an install."""
    beside = Path(__file__).resolve().parents[2] / "migrations"
    if (beside / "env.py").is_file():
        return beside
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.origin is not None:
        found = Path(spec.origin).parent
        if (found / "env.py").is_file():
            return found
    raise FileNotFoundError(f"Alembic migrations not found (looked in {beside})")


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def ensure_sqlite_dir(url: str | URL) -> None:
    """Create the folder of a file-backed SQLite database (SQLite will not); else do nothing."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite" and not _is_memory_sqlite(url):
        assert url.database is not None
        if not url.database.startswith("file:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (API, progress) run while a worker commits; NORMAL is durable with WAL.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _url(url: str | URL | SecretStr) -> URL:
    return make_url(url.get_secret_value() if isinstance(url, SecretStr) else url)


def make_engine(url: str | URL | SecretStr, **kwargs: Any) -> Engine:
    """An engine for `url`. SQLite: WAL, busy timeout, foreign keys on, usable from any thread.
    PostgreSQL (and others): connections are pinged before use, so a restarted server recovers.
    Extra keyword arguments go to `create_engine`."""
    url = _url(url)
    if url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)

    ensure_sqlite_dir(url)
    connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
    if _is_memory_sqlite(url):
        # Each connection to :memory: is a new empty database: share one across threads.
        kwargs.setdefault("poolclass", StaticPool)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`. Objects stay readable after commit (`expire_on_commit=False`),
    so an API handler can serialise what it just wrote without another round trip."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | URL | SecretStr) -> Config:
    """An Alembic config for `url` that works from any working directory and from an install."""
    from alembic.config import Config

    url = _url(url)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolates "%": percent-escaped passwords must be doubled to survive.
    url_text = url.render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url_text)
    return config


def upgrade_database(url: str | URL | SecretStr, revision: str = "head") -> None:
    """Bring the schema at `url` to `revision` (default: the latest) with Alembic."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
