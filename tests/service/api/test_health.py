"""Probes and metrics: /healthz, /readyz (503 when the database or storage does not answer),
/metrics; OpenAPI operation ids."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service.api import app as app_module
from service.api import create_app
from service.db import ApiKey, make_engine
from service.db.keys import new_api_key
from service.jobs import HEAD_REVISION, tenant_id
from service.settings import Settings

BAD_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2"


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}


def test_database_down(tmp_path: Path) -> None:
    settings = Settings.from_values(home=tmp_path, database_url=BAD_DATABASE)
    with TestClient(create_app(settings)) as client:  # starts anyway, not ready
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["database"] == "error: OperationalError"  # no host, no message
        assert body["checks"]["storage"] == "ok"
        api = client.get("/v1/jobs", headers={"Authorization": "Bearer " + "k" * 43})
        assert api.status_code == 503
        assert api.json() == {"detail": "database unavailable, try again"}


def test_storage_down(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        storage_url="s3://nowhere-bucket/out",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_max_attempts=1,
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["database"] == "ok" and checks["storage"].startswith("error: ")
        assert "nowhere-bucket" not in response.text and "127.0.0.1" not in response.text
        # and tenants' 503s name neither bucket nor endpoint
        ctx = client.app.state.context  # type: ignore[attr-defined]
        clear, prefix, key_hash = new_api_key()
        with ctx.session() as session:
            tid = tenant_id(ctx, "alice")
            session.add(ApiKey(tenant_id=tid, prefix=prefix, key_hash=key_hash))
        auth = {"Authorization": f"Bearer {clear}"}
        submitted = client.post("/v1/jobs", headers=auth, json={"kind": "sample", "count": 1})
        assert submitted.status_code == 503
        assert submitted.json() == {"detail": "storage unavailable, try again"}


@pytest.fixture
def empty_database(api_database_url: str) -> Iterator[str]:
    """A second, empty (never migrated) database."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(api_database_url)
    name = f"dpig_api_empty_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrates_when_the_database_comes_back(
    empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = app_module.open_context

    def down_at_startup(settings: Settings, **kwargs: Any) -> Any:
        if kwargs.get("migrate", True):
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return real_open(settings, **kwargs)

    monkeypatch.setattr(app_module, "open_context", down_at_startup)
    settings = Settings.from_values(home=tmp_path, database_url=empty_database)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.migrated is False  # type: ignore[attr-defined]
        assert client.get("/readyz").status_code == 200
    engine = make_engine(empty_database)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            HEAD_REVISION
        )
    engine.dispose()


def test_metrics(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "python_info" in response.text or "process_" in response.text


def test_metrics_multiprocess(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import CollectorRegistry, Counter, values

    folder = tmp_path / "prom"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    counter = Counter("dpig_test_api_total", "test", registry=CollectorRegistry())
    counter.inc(3)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "dpig_test_api_total 3.0" in response.text


def test_operation_ids(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ids = {
        f"{method.upper()} {path}": op["operationId"]
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }
    assert ids["POST /v1/jobs"] == "jobs-submit_job"
    assert ids["POST /v1/jobs/{job_id}:cancel"] == "jobs-cancel_job"
    assert ids["GET /v1/jobs/{job_id}/events"] == "jobs-job_events"
    assert ids["GET /v1/models"] == "models-list_models"
    assert ids["GET /readyz"] == "health-readyz"
    assert len(set(ids.values())) == len(ids) == 13
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
