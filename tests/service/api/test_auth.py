"""Bearer API keys: missing, malformed, unknown and revoked keys get 401; `dpig keys` works."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app as cli_app
from service.settings import get_settings

Headers = dict[str, str]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-real-key-at-all-000000000000000000",
        "Bearer short",
        "Bearer ../../etc/passwd",
    ],
    ids=["missing", "empty", "no-key", "basic", "unknown", "too-short", "not-a-key"],
)
def test_bad_key_is_401(client: TestClient, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/jobs")]:
        response = client.request(method, path, headers=headers, json={"kind": "sample"})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]


def test_valid_key(client: TestClient, auth: Headers) -> None:
    response = client.get("/v1/jobs", headers=auth)
    assert response.status_code == 200
    assert response.json() == {"data": [], "count": 0, "next_cursor": None}
    key = auth["Authorization"].split()[1]
    assert client.get("/v1/jobs", headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_tampered_key_is_401(client: TestClient, auth: Headers) -> None:
    key = auth["Authorization"].split()[1]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {tampered}"})
    assert response.status_code == 401


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, clean_database: str, tmp_path: Path
) -> Iterator[CliRunner]:
    """`dpig` pointed at the test database through DPIG_* variables."""
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("DPIG_DATABASE_URL", clean_database)
    monkeypatch.setenv("DPIG_STORAGE_URL", (tmp_path / "outputs").as_uri())
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_keys_cli_create_use_revoke(
    client: TestClient, cli_env: CliRunner, sample_spec: Callable[..., dict]
) -> None:
    result = cli_env.invoke(cli_app, ["keys", "create", "--tenant", "carol", "--json"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["tenant"] == "carol" and made["prefix"] == made["key"][:8]
    headers = {"Authorization": f"Bearer {made['key']}"}
    submitted = client.post("/v1/jobs", headers=headers, json=sample_spec())
    assert submitted.status_code == 201, submitted.text

    # a second key of the same tenant sees the same jobs
    plain = cli_env.invoke(cli_app, ["keys", "create", "--tenant", "carol"])
    assert plain.exit_code == 0, plain.output
    second = plain.stdout.strip()
    listed = client.get("/v1/jobs", headers={"Authorization": f"Bearer {second}"}).json()
    assert [job["id"] for job in listed["data"]] == [submitted.json()["id"]]

    keys = json.loads(cli_env.invoke(cli_app, ["keys", "list", "--json"]).stdout)
    assert {k["prefix"] for k in keys} == {made["prefix"], second[:8]}
    assert all(k["tenant"] == "carol" and k["revoked_at"] is None for k in keys)

    revoked = cli_env.invoke(cli_app, ["keys", "revoke", made["prefix"]])
    assert revoked.exit_code == 0, revoked.output
    response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {second}"}).status_code == 200

    again = cli_env.invoke(cli_app, ["keys", "revoke", made["prefix"]])
    assert again.exit_code == 2
    assert "no live key" in again.output


def test_keys_cli_refuses_empty_tenant(cli_env: CliRunner) -> None:
    result = cli_env.invoke(cli_app, ["keys", "create", "--tenant", "  "])
    assert result.exit_code == 2
    assert "--tenant" in result.output


def test_keys_cli_webhook_secret(
    cli_env: CliRunner, monkeypatch: pytest.MonkeyPatch, ctx: Any
) -> None:
    from service.jobs import tenant_id
    from service.settings import Settings
    from service.webhooks import tenant_secret

    assert cli_env.invoke(cli_app, ["keys", "create", "--tenant", "dave"]).exit_code == 0
    off = cli_env.invoke(cli_app, ["keys", "webhook-secret", "--tenant", "dave"])
    assert off.exit_code == 2 and "DPIG_WEBHOOK_SIGNING_KEY" in off.output
    monkeypatch.setenv("DPIG_WEBHOOK_SIGNING_KEY", "operator-key-0123456789")
    get_settings.cache_clear()
    shown = cli_env.invoke(cli_app, ["keys", "webhook-secret", "--tenant", "dave"])
    assert shown.exit_code == 0, shown.output
    settings = Settings.from_values(webhook_signing_key="operator-key-0123456789")
    assert shown.stdout.strip() == tenant_secret(settings, tenant_id(ctx, "dave"))
    unknown = cli_env.invoke(cli_app, ["keys", "webhook-secret", "--tenant", "nobody"])
    assert unknown.exit_code == 2 and "no tenant 'nobody'" in unknown.output
