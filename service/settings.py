"""One settings object for the API, the workers and the CLI (env prefix ``DPIG_``).

The defaults are the embedded mode: SQLite and a local output folder under ``DPIG_HOME``, no broker
(jobs run in-process), no API URL (the CLI works in-process). Production sets
``DPIG_DATABASE_URL`` (postgresql+psycopg), ``DPIG_BROKER_URL`` (redis), ``DPIG_STORAGE_URL``
(``s3://bucket/prefix``) and the S3 endpoint and credentials.

List settings (``DPIG_ALLOWED_SOURCE_PREFIXES``, ``DPIG_MODEL_DIRS``) take a JSON list or a
comma-separated string.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = ["Settings", "get_settings", "normalize_location"]

_POSTGRES_SCHEMES = ("postgres://", "postgresql://")


def normalize_location(value: str, *, field: str) -> str:
    """Canonical ``s3://bucket/prefix`` or ``file:///abs/path`` for a storage URL or a local path.

    A bare local path (absolute, relative or ``~``) becomes a ``file://`` URL of its absolute form.
    Trailing slashes are dropped. Anything else raises ``ValueError`` naming ``field``.
    """
    value = value.strip()
    if not value:
        raise ValueError(f"{field}: empty location")
    if "://" not in value:
        return Path(value).expanduser().absolute().as_uri()
    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise ValueError(f"{field}: {value!r} must not carry a query or fragment")
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{field}: {value!r} has no bucket (expected s3://bucket/prefix)")
        prefix = parts.path.strip("/")
        return f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{field}: {value!r} names a remote host; use file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{field}: {value!r} must hold an absolute path (file:///abs/path)")
        return Path(path).as_uri()
    raise ValueError(
        f"{field}: scheme {parts.scheme!r} of {value!r} is not supported; "
        "use s3://bucket/prefix or file:///absolute/path"
    )


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """dpig settings; every field reads ``DPIG_<FIELD>`` from the environment or a ``.env`` file.

    S3 credentials: when ``aws_access_key_id`` / ``aws_secret_access_key`` (and ``s3_region``,
    ``s3_endpoint_url``) are unset, boto3's normal chain applies: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/credentials``,
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``, then container and instance roles (IRSA).

    S3 retries (``s3_retry_mode``, ``s3_max_attempts``, which counts the first call): botocore's
    exponential backoff with jitter, capped at 20 s a wait, so the default 10 attempts ride out
    roughly one minute of S3 being unavailable; longer outages fall to chunk retries.

    Source images (``allowed_source_prefixes``): a job may read sources only from under one of
    these ``s3://bucket/prefix`` or ``file:///abs/dir`` prefixes. Empty (the default) means only the
    storage location itself: the whole bucket of an ``s3://`` storage URL, or the output folder of
    a ``file://`` one. Nothing is ever fetched from http(s) URLs.
    """

    model_config = SettingsConfigDict(
        env_prefix="DPIG_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
    )

    home: Path = Field(default=Path("~/.dpig"), validate_default=True)
    database_url: str = Field(default_factory=lambda data: f"sqlite:///{data['home']}/dpig.db")
    storage_url: str = Field(
        default_factory=lambda data: (data["home"] / "outputs").as_uri(), validate_default=True
    )
    broker_url: str | None = None
    api_url: str | None = None

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    s3_max_attempts: int = Field(default=10, ge=1)

    allowed_source_prefixes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda data: [data["home"] / "models"]
    )

    chunk_size: int = Field(default=1024, ge=1)
    max_attempts: int = Field(default=5, ge=1)
    lease_seconds: int = Field(default=300, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    max_items_per_job: int = Field(default=10_000_000, ge=1)
    max_active_jobs: int = Field(default=100, ge=1)
    # A chunk is a row, a shard and a task: a cap keeps one request from writing millions of them.
    max_chunks_per_job: int = Field(default=100_000, ge=1)

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url", mode="after")
    @classmethod
    def _psycopg_driver(cls, value: str) -> str:
        for scheme in _POSTGRES_SCHEMES:
            if value.startswith(scheme):
                return "postgresql+psycopg://" + value[len(scheme) :]
        return value

    @field_validator("storage_url", mode="after")
    @classmethod
    def _storage_location(cls, value: str) -> str:
        return normalize_location(value, field="storage_url")

    @field_validator("allowed_source_prefixes", "model_dirs", mode="before")
    @classmethod
    def _list_from_string(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_source_prefixes", mode="after")
    @classmethod
    def _source_locations(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [normalize_location(item, field=str(info.field_name)) for item in value]

    @field_validator("model_dirs", mode="after")
    @classmethod
    def _absolute_dirs(cls, value: list[Path]) -> list[Path]:
        return [path.expanduser().absolute() for path in value]

    @classmethod
    def from_values(cls, **values: Any) -> Settings:
        """Settings from ``values`` and the defaults only, ignoring the environment (for tests)."""
        return _ExplicitSettings(**values)

    @property
    def source_prefixes(self) -> list[str]:
        """The effective allow-list for source URIs (see the class docstring)."""
        if self.allowed_source_prefixes:
            return list(self.allowed_source_prefixes)
        if self.storage_url.startswith("s3://"):
            return ["s3://" + urlsplit(self.storage_url).netloc]
        return [self.storage_url]

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when ``database_url`` is a file-backed SQLite URL, else None."""
        prefix = "sqlite:///"
        if not self.database_url.startswith(prefix):
            return None
        path = self.database_url[len(prefix) :].split("?", 1)[0]
        return None if path in ("", ":memory:") else Path(path)

    def ensure_dirs(self) -> None:
        """Create the home folder and the SQLite database's folder (never done at import)."""
        self.home.mkdir(parents=True, exist_ok=True)
        if (db := self.sqlite_path) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)


class _ExplicitSettings(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests call ``get_settings.cache_clear()``."""
    return Settings()
