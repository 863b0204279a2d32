"""Alembic migrations: the only way the dpig schema changes (see `service.db.upgrade_database`)."""
