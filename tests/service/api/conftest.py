"""API-test fixtures: the real app (`create_app`) on a throwaway PostgreSQL database and a local
output folder, tenants with bearer keys, and views of what was written (job rows, objects).

PostgreSQL is reached at `DPIG_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/
postgres`, trust auth); without it these tests are skipped, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from service.api import create_app
from service.db import ApiKey, Base, Job, make_engine
from service.db.keys import new_api_key
from service.jobs import Context, tenant_id
from service.settings import Settings

Headers = dict[str, str]


@pytest.fixture(scope="session")
def api_database_url(new_postgres_database: Callable[..., str]) -> str:
    """A migrated PostgreSQL database for the session."""
    return new_postgres_database("dpig_api_test")


@pytest.fixture
def clean_database(api_database_url: str) -> Iterator[str]:
    """The session database, emptied after the test."""
    yield api_database_url
    engine = make_engine(api_database_url)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
    finally:
        engine.dispose()


@pytest.fixture
def make_settings(clean_database: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for an app on the test database and `tmp_path/outputs`; keywords override."""

    def make(**values: Any) -> Settings:
        base: dict[str, Any] = {
            "home": tmp_path / "home",
            "database_url": clean_database,
            "storage_url": (tmp_path / "outputs").as_uri(),
        }
        return Settings.from_values(**(base | values))

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client of the running app (lifespan entered: the context is open)."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def ctx(client: TestClient) -> Context:
    """The app's own job-service context."""
    context: Context = client.app.state.context  # type: ignore[attr-defined]
    return context


def _add_key(ctx: Context, tenant: str) -> tuple[str, int]:
    tid = tenant_id(ctx, tenant)
    clear, prefix, key_hash = new_api_key()
    with ctx.session() as session:
        session.add(ApiKey(tenant_id=tid, prefix=prefix, key_hash=key_hash))
    return clear, tid


@pytest.fixture
def add_key(ctx: Context) -> Callable[[str], tuple[str, int]]:
    """Make a live API key for a tenant (created if missing): returns (clear key, tenant id)."""
    return lambda tenant: _add_key(ctx, tenant)


@pytest.fixture
def auth(ctx: Context) -> Headers:
    """Bearer headers of tenant 'alice'."""
    return {"Authorization": f"Bearer {_add_key(ctx, 'alice')[0]}"}


@pytest.fixture
def other_auth(ctx: Context) -> Headers:
    """Bearer headers of tenant 'bob'."""
    return {"Authorization": f"Bearer {_add_key(ctx, 'bob')[0]}"}


@pytest.fixture
def written(ctx: Context) -> Callable[[], tuple[int, list[str]]]:
    """What the service has written so far: (job rows, storage keys)."""

    def snapshot() -> tuple[int, list[str]]:
        with ctx.session() as session:
            jobs = int(session.scalar(select(func.count()).select_from(Job)) or 0)
        return jobs, ctx.storage.list("")

    return snapshot


@pytest.fixture
def sample_spec() -> Callable[..., dict[str, Any]]:
    """A small valid `sample` job on the bundled model; keywords override fields."""
    return lambda **values: {
        "kind": "sample",
        "count": 4,
        "chunk_size": 2,
        "model": "default",
        **values,
    }
