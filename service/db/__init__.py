"""Persistence: SQLAlchemy models, engines and sessions, Alembic upgrades, API key hashing."""

from service.db.keys import hash_api_key, key_prefix, new_api_key, verify_api_key
from service.db.models import (
    TERMINAL_JOB_STATES,
    ApiKey,
    Base,
    Chunk,
    ChunkState,
    Job,
    JobState,
    Queue,
    RegisteredModel,
    Tenant,
    WebhookDelivery,
    new_id,
    utcnow,
)
from service.db.session import (
    alembic_config,
    ensure_sqlite_dir,
    make_engine,
    migrations_dir,
    session_factory,
    upgrade_database,
)

__all__ = [
    "TERMINAL_JOB_STATES",
    "ApiKey",
    "Base",
    "Chunk",
    "ChunkState",
    "Job",
    "JobState",
    "Queue",
    "RegisteredModel",
    "Tenant",
    "WebhookDelivery",
    "alembic_config",
    "ensure_sqlite_dir",
    "hash_api_key",
    "key_prefix",
    "make_engine",
    "migrations_dir",
    "new_api_key",
    "new_id",
    "session_factory",
    "upgrade_database",
    "utcnow",
    "verify_api_key",
]
