"""Settings: embedded defaults, DPIG_ environment parsing, URL normalisation, lazy folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, get_settings, normalize_location


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean DPIG_ environment in an empty working folder (no stray .env)."""
    for name in list(os.environ):
        if name.startswith("DPIG_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_embedded_defaults(tmp_path: Path) -> None:
    s = Settings.from_values(home=tmp_path)
    assert s.home == tmp_path
    assert s.database_url.get_secret_value() == f"sqlite:///{tmp_path}/dpig.db"
    assert s.sqlite_path == tmp_path / "dpig.db"
    assert s.storage_url == (tmp_path / "outputs").as_uri()
    assert s.broker_url is None
    assert s.api_url is None
    assert (s.s3_endpoint_url, s.s3_region, s.aws_access_key_id, s.aws_secret_access_key) == (
        None, None, None, None,
    )  # fmt: skip
    assert s.allowed_source_prefixes == []
    assert s.source_prefixes == [(tmp_path / "outputs").as_uri()]
    assert s.model_dirs == [tmp_path / "models"]
    assert (s.chunk_size, s.max_attempts, s.lease_seconds, s.max_body_bytes) == (
        1024, 5, 300, 1_000_000,
    )  # fmt: skip
    assert (s.max_items_per_job, s.max_active_jobs) == (10_000_000, 100)


def test_home_defaults_to_user_folder(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("HOME", str(tmp_path))
    s = Settings()
    assert s.home == tmp_path / ".dpig"
    assert s.database_url.get_secret_value() == f"sqlite:///{tmp_path}/.dpig/dpig.db"


def test_nothing_created_until_asked(tmp_path: Path) -> None:
    s = Settings.from_values(home=tmp_path / "h")
    assert not (tmp_path / "h").exists()
    s.ensure_dirs()
    assert (tmp_path / "h").is_dir()
    other = Settings.from_values(home=tmp_path / "h2", database_url=f"sqlite:///{tmp_path}/db/x.db")
    other.ensure_dirs()
    assert (tmp_path / "db").is_dir()


def test_import_creates_no_folders(tmp_path: Path) -> None:
    code = (
        "import service.settings, service.storage; "
        "s = service.settings.get_settings(); "
        "service.storage.storage_from_url(s.storage_url, s).list()"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DPIG_")}
    environ["HOME"] = str(tmp_path)
    subprocess.run([sys.executable, "-c", code], check=True, env=environ, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_env_parsing(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DPIG_HOME", str(tmp_path / "home"))
    env.setenv("DPIG_CHUNK_SIZE", "256")
    env.setenv("DPIG_MAX_ACTIVE_JOBS", "3")
    env.setenv("DPIG_BROKER_URL", "redis://127.0.0.1:6379/0")
    env.setenv("DPIG_API_URL", "http://127.0.0.1:8000")
    env.setenv("DPIG_STORAGE_URL", "s3://dpig-out/prod/")
    env.setenv("DPIG_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    env.setenv("DPIG_AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    env.setenv("DPIG_AWS_SECRET_ACCESS_KEY", "hunter2")
    env.setenv("DPIG_S3_RETRY_MODE", "adaptive")
    env.setenv("DPIG_ALLOWED_SOURCE_PREFIXES", "s3://photos/set1/, s3://more")
    env.setenv("DPIG_MODEL_DIRS", '["/srv/models", "~/m"]')
    env.setenv("DPIG_LEASE_SECONDS", "")  # empty means unset
    s = Settings()
    assert s.home == tmp_path / "home"
    assert s.database_url.get_secret_value() == f"sqlite:///{tmp_path}/home/dpig.db"
    assert s.chunk_size == 256
    assert s.max_active_jobs == 3
    assert s.lease_seconds == 300
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.api_url == "http://127.0.0.1:8000"
    assert s.storage_url == "s3://dpig-out/prod"
    assert s.s3_endpoint_url == "http://127.0.0.1:8333"
    assert s.aws_access_key_id == "AKIAEXAMPLE"
    assert s.aws_secret_access_key is not None
    assert s.aws_secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)
    assert s.s3_retry_mode == "adaptive"
    assert s.allowed_source_prefixes == ["s3://photos/set1", "s3://more"]
    assert s.source_prefixes == ["s3://photos/set1", "s3://more", "s3://dpig-out/prod"]
    assert s.model_dirs == [Path("/srv/models"), Path.home() / "m"]


def test_dotenv_file_is_read(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    Path(".env").write_text(f"DPIG_HOME={tmp_path}/dot\nDPIG_CHUNK_SIZE=64\n")
    s = Settings()
    assert (s.home, s.chunk_size) == (tmp_path / "dot", 64)


def test_s3_storage_is_readable_only_at_its_own_location(tmp_path: Path) -> None:
    # not the whole bucket: the rest of it may hold anything (tenancy narrows the store further)
    s = Settings.from_values(home=tmp_path, storage_url="s3://dpig-out/prod/v2")
    assert s.source_prefixes == ["s3://dpig-out/prod/v2"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/dpig", "postgresql+psycopg://u:p@db:5432/dpig"),
        (
            "postgresql://u@db/dpig?sslmode=require",
            "postgresql+psycopg://u@db/dpig?sslmode=require",
        ),
        ("postgresql+psycopg://u@db/dpig", "postgresql+psycopg://u@db/dpig"),
        ("sqlite:////var/lib/dpig.db", "sqlite:////var/lib/dpig.db"),
    ],
)
def test_database_url_driver_rewrite(env: pytest.MonkeyPatch, given: str, expected: str) -> None:
    assert Settings.from_values(database_url=given).database_url.get_secret_value() == expected
    env.setenv("DPIG_DATABASE_URL", given)
    assert Settings().database_url.get_secret_value() == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("s3://bucket/", "s3://bucket"),
        ("file:///srv/out/", "file:///srv/out"),
        ("file://localhost/srv/out", "file:///srv/out"),
        ("/srv/out dir", "file:///srv/out%20dir"),
        ("file:///srv/out%20dir", "file:///srv/out%20dir"),
    ],
)
def test_storage_url_normalised(given: str, expected: str) -> None:
    assert Settings.from_values(storage_url=given).storage_url == expected


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("storage_url", "http://example.com/out", "scheme 'http'"),
        ("storage_url", "s3:///prefix", "no bucket"),
        ("storage_url", "file://host/x", "remote host"),
        ("allowed_source_prefixes", ["https://example.com/"], "scheme 'https'"),
        ("chunk_size", 0, "greater than or equal to 1"),
        ("max_items_per_job", -5, "greater than or equal to 1"),
        ("s3_retry_mode", "legacy", "'standard' or 'adaptive'"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings.from_values(**{field: value})
    message = str(info.value)
    assert field in message
    assert problem in message


def test_bad_env_value_fails(env: pytest.MonkeyPatch) -> None:
    env.setenv("DPIG_MAX_ATTEMPTS", "many")
    with pytest.raises(ValidationError, match="max_attempts"):
        Settings()


def test_from_values_ignores_environment(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DPIG_CHUNK_SIZE", "7")
    env.setenv("DPIG_BROKER_URL", "redis://x")
    assert Settings().chunk_size == 7
    s = Settings.from_values(home=tmp_path, max_attempts=2)
    assert isinstance(s, Settings)
    assert (s.chunk_size, s.broker_url, s.max_attempts) == (1024, None, 2)


def test_get_settings_is_cached(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DPIG_HOME", str(tmp_path))
    first = get_settings()
    env.setenv("DPIG_CHUNK_SIZE", "9")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().chunk_size == 9


def test_normalize_location_relative_path(env: pytest.MonkeyPatch) -> None:
    assert normalize_location("out", field="x") == (Path.cwd() / "out").as_uri()
    with pytest.raises(ValueError, match="^x: empty"):
        normalize_location("  ", field="x")


def test_tenant_policies_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "DPIG_TENANTS",
        '{"acme": {"source_prefixes": ["s3://acme/in/"], "queues": ["bulk", "interactive"],'
        ' "max_priority": 10}}',
    )
    env.setenv("DPIG_DEFAULT_QUEUES", "bulk")
    s = Settings()
    assert s.policy("acme").source_prefixes == ["s3://acme/in"]
    assert (s.queues("acme"), s.max_priority("acme")) == (["bulk", "interactive"], 10)
    assert (s.queues("other"), s.max_priority("other")) == (["bulk"], 0)
    env.setenv("DPIG_TENANTS", '{"acme": {"queues": ["fast"]}}')
    with pytest.raises(ValidationError):
        Settings()


def test_database_password_stays_out_of_repr_and_dumps(tmp_path: Path) -> None:
    s = Settings.from_values(home=tmp_path, database_url="postgresql://dpig:hunter2@db:5432/dpig")
    assert s.database_url.get_secret_value() == "postgresql+psycopg://dpig:hunter2@db:5432/dpig"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    # a settings dump (a debug endpoint, a log line of the config) shows only stars
    assert "hunter2" not in s.model_dump_json() and "hunter2" not in str(s.model_dump())
    assert "hunter2" not in str(s.database_url)


def test_engine_and_migrations_take_the_secret_url(tmp_path: Path) -> None:
    from service.db.session import alembic_config, make_engine

    s = Settings.from_values(home=tmp_path, database_url="postgresql://dpig:hunter2@db:5432/dpig")
    assert make_engine(s.database_url).url.password == "hunter2"
    assert "hunter2" in (alembic_config(s.database_url).get_main_option("sqlalchemy.url") or "")
