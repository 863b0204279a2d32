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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = ["Settings", "TenantPolicy", "get_settings", "normalize_location"]

QueueName = Literal["interactive", "bulk"]
_DEFAULT_QUEUES: tuple[QueueName, ...] = ("bulk",)
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


class TenantPolicy(BaseModel):
    """What the operator allows one tenant beyond the defaults (``Settings.tenants``)."""

    model_config = ConfigDict(extra="forbid")

    source_prefixes: list[str] = Field(default_factory=list)
    max_priority: int | None = Field(default=None, ge=-100, le=100)
    queues: list[QueueName] | None = None

    @field_validator("source_prefixes", mode="after")
    @classmethod
    def _locations(cls, value: list[str]) -> list[str]:
        return [normalize_location(item, field="tenants.source_prefixes") for item in value]


class Settings(BaseSettings):
    """dpig settings; every field reads ``DPIG_<FIELD>`` from the environment or a ``.env`` file.

    S3 credentials: when ``aws_access_key_id`` / ``aws_secret_access_key`` (and ``s3_region``,
    ``s3_endpoint_url``) are unset, boto3's normal chain applies: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/credentials``,
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``, then container and instance roles (IRSA).

    S3 retries (``s3_retry_mode``, ``s3_max_attempts``, which counts the first call): botocore's
    exponential backoff with jitter, capped at 20 s a wait, so the default 10 attempts ride out
    roughly one minute of S3 being unavailable; longer outages fall to chunk retries.

    Source images: a tenant's job may read sources from under the global
    ``allowed_source_prefixes`` (shared read-only datasets), its own ``tenants.<name>.
    source_prefixes``, and its own jobs' outputs (``<storage_url>/jobs/<job id>/``); never from
    other tenants' outputs (``service.tenancy``). Nothing is ever fetched from http(s) URLs.

    Per-tenant policy (``tenants``): a JSON object ``{"<tenant>": {"source_prefixes": [...],
    "max_priority": 10, "queues": ["bulk", "interactive"]}}``; a tenant not named there (or a
    field left out) gets ``default_max_priority`` and ``default_queues``.
    """

    model_config = SettingsConfigDict(
        env_prefix="DPIG_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
    )

    home: Path = Field(default=Path("~/.dpig"), validate_default=True)
    # holds the database password: a secret, so repr(), str() and model_dump() show only stars
    database_url: SecretStr = Field(
        default_factory=lambda data: SecretStr(f"sqlite:///{data['home']}/dpig.db")
    )
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
    # fixed on each job at submit (its `execution`, also in job.json): every worker runs the
    # job's chunks with this micro-batch size and precision, and refuses them on another device
    # class (None: any), so an item's bytes do not depend on which worker made it
    batch_size: int = Field(default=32, ge=1, le=4096)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str | None = None
    max_attempts: int = Field(default=5, ge=1)
    lease_seconds: int = Field(default=300, ge=1)
    # a running chunk asks whether its job was paused or cancelled at most this often (and once
    # more before its commit): one query per micro-batch would be ~16/s per GPU worker
    stop_check_seconds: float = Field(default=1.0, ge=0, le=60)
    # threads that encode and hash images beside the model; None: the container's CPU quota;
    # 0: encode in the model's thread, one image after another (no overlap)
    encode_workers: int | None = Field(default=None, ge=0, le=256)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    max_items_per_job: int = Field(default=10_000_000, ge=1)
    max_active_jobs: int = Field(default=100, ge=0)
    # tenant isolation and resource limits (docs/operations.md, "Tenants and limits")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    default_max_priority: int = Field(default=0, ge=-100, le=100)
    default_queues: Annotated[list[QueueName], NoDecode] = Field(
        default_factory=lambda: list(_DEFAULT_QUEUES)
    )
    # a pose grid lists at most this many source images, scanning at most max_listed_objects keys
    max_source_images: int = Field(default=100_000, ge=1)
    max_listed_objects: int = Field(default=1_000_000, ge=1)
    max_chunk_size: int = Field(default=4096, ge=1)
    max_source_bytes: int = Field(default=20_000_000, ge=1)
    max_source_pixels: int = Field(default=16_000_000, ge=1)
    source_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "BMP"]
    )
    max_event_streams_per_tenant: int = Field(default=8, ge=1)
    max_presign_seconds: int = Field(default=86_400, ge=1, le=7 * 24 * 3600)
    # A chunk is a row, a shard and a task: a cap keeps one request from writing millions of them.
    max_chunks_per_job: int = Field(default=100_000, ge=1)
    # Job expiry and output retention (service.retention); a job's own value wins. None: never.
    default_expires_after_s: int | None = Field(default=None, ge=60)
    default_retain_days: int | None = Field(default=None, ge=1)
    # Whether the workers have a pose estimator (the `pose` extra); None: whether this process has.
    pose_estimator_installed: bool | None = None
    # Webhooks (service.webhooks): callback hosts must be on the allow-list ("host" or
    # "*.example.com"); private, loopback and link-local addresses only with allow_private.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_allow_private: bool = False
    webhook_signing_key: SecretStr | None = None  # derives each tenant's HMAC secret
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_s: float = Field(default=10.0, gt=0)  # doubles per attempt, up to 1 h
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url", mode="after")
    @classmethod
    def _psycopg_driver(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        for scheme in _POSTGRES_SCHEMES:
            if url.startswith(scheme):
                return SecretStr("postgresql+psycopg://" + url[len(scheme) :])
        return value

    @field_validator("storage_url", mode="after")
    @classmethod
    def _storage_location(cls, value: str) -> str:
        return normalize_location(value, field="storage_url")

    @field_validator(
        "allowed_source_prefixes",
        "model_dirs",
        "default_queues",
        "source_formats",
        "webhook_allowed_hosts",
        mode="before",
    )
    @classmethod
    def _list_from_string(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_source_prefixes", mode="after")
    @classmethod
    def _source_locations(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [normalize_location(item, field=str(info.field_name)) for item in value]

    @field_validator("source_formats", mode="after")
    @classmethod
    def _format_names(cls, value: list[str]) -> list[str]:
        return [name.upper() for name in value]  # PIL's names: PNG, JPEG, WEBP, BMP

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
        """Everywhere a worker may read a source at all: the global and every tenant's prefixes,
        and the output store (its own outputs). Which of these one tenant may name is checked at
        submit (``service.tenancy.check_source``)."""
        out = list(self.allowed_source_prefixes)
        for policy in self.tenants.values():
            out += policy.source_prefixes
        return [*out, self.storage_url]

    def policy(self, tenant: str) -> TenantPolicy:
        """The operator's policy for tenant ``tenant`` (an empty one when not configured)."""
        return self.tenants.get(tenant) or TenantPolicy()

    def max_priority(self, tenant: str) -> int:
        found = self.policy(tenant).max_priority
        return self.default_max_priority if found is None else found

    def queues(self, tenant: str) -> list[str]:
        found = self.policy(tenant).queues
        return list(self.default_queues if found is None else found)

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when ``database_url`` is a file-backed SQLite URL, else None."""
        prefix, url = "sqlite:///", self.database_url.get_secret_value()
        if not url.startswith(prefix):
            return None
        path = url[len(prefix) :].split("?", 1)[0]
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
