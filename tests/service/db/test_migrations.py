"""Alembic migrations: round trip, no drift from the models, and how the URL is found."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import SecretStr
from sqlalchemy import create_engine, inspect, make_url

from service.db import Base, alembic_config, upgrade_database
from service.db.session import migrations_dir

TABLES = {"tenants", "api_keys", "registered_models", "jobs", "chunks"}


def _current(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _head() -> str:
    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    assert head is not None
    return head


def test_history_is_linear() -> None:
    script = ScriptDirectory(str(migrations_dir()))
    assert len(script.get_heads()) == 1
    assert [rev.revision for rev in script.walk_revisions()][-1] == "0001"


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    upgrade_database(db_url)
    assert TABLES <= _tables(db_url)
    assert _current(db_url) == _head()

    command.downgrade(alembic_config(db_url), "base")
    assert _tables(db_url) <= {"alembic_version"}
    assert _current(db_url) is None

    upgrade_database(db_url)
    assert TABLES <= _tables(db_url)
    assert _current(db_url) == _head()


def test_models_match_migrations(db_url: str) -> None:
    upgrade_database(db_url)
    assert _diff(db_url) == []


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade_database(db_url)
    upgrade_database(db_url)
    assert _current(db_url) == _head()


def test_upgrade_from_another_directory(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    upgrade_database(sqlite_url)  # also creates the database's missing folder
    assert TABLES <= _tables(sqlite_url)


def test_url_comes_from_settings_when_not_given(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.settings

    fake = SimpleNamespace(database_url=SecretStr(sqlite_url))  # as Settings holds it
    monkeypatch.setattr(service.settings, "get_settings", lambda: fake)
    upgrade_database(sqlite_url)  # creates the folder; then drop everything and go again
    command.downgrade(alembic_config(sqlite_url), "base")

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    command.upgrade(config, "head")
    assert TABLES <= _tables(sqlite_url)


def test_percent_escapes_survive_config_interpolation() -> None:
    url = "postgresql+psycopg://user:p%40ss%25@db.example:5432/dpig"
    stored = alembic_config(url).get_main_option("sqlalchemy.url")
    assert stored == url
    assert make_url(stored).password == "p@ss%"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_offline_sql(dialect: str) -> None:
    url = "sqlite://" if dialect == "sqlite" else "postgresql+psycopg://u@h/db"
    config = alembic_config(url)
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE chunks" in sql
    assert "WHERE state = 'pending'" in sql


def test_concurrent_upgrades_take_turns(postgres_url: str) -> None:
    # Separate processes, as replicas would be (Alembic's context is process-global).
    command.downgrade(alembic_config(postgres_url), "base")
    code = "import sys; from service.db import upgrade_database; upgrade_database(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, postgres_url], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert _current(postgres_url) == _head()
