"""Database fixtures: a throwaway PostgreSQL database per test session, and SQLite files.

PostgreSQL is reached at `DPIG_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/
postgres`, trust auth); tests that need it are skipped, with the reason, when it does not answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

from service.db import Base, make_engine, session_factory, upgrade_database

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_url(new_postgres_database: Callable[..., str]) -> str:
    """A SQLAlchemy URL to an empty, uniquely named PostgreSQL database."""
    return new_postgres_database("dpig_test", migrate=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file that does not exist yet (its folder does not either)."""
    return f"sqlite:///{tmp_path / 'home' / 'dpig.db'}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test runs once on SQLite and once on PostgreSQL (skipped if unreachable)."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    url = request.getfixturevalue("sqlite_url")
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database; every row is deleted after the test (the session database is shared)."""
    upgrade_database(db_url)
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
        engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session
