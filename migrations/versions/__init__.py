"""Alembic revisions, named `<rev>_<slug>.py` (`0001_initial.py`, `0002_…`)."""
