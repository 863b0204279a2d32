"""The HTTP API (FastAPI, DESIGN §5): `create_app(settings)` builds the application."""

from service.api.app import create_app

__all__ = ["create_app"]
