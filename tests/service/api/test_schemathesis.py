"""Property-based API tests (schemathesis): for every operation in the app's OpenAPI schema,
generated requests with a valid key never get a 5xx."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from service.api import create_app
from service.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MAX_EXAMPLES = 25

# The schema does not depend on the database: build it from an app that is never started.
_home = Path(tempfile.gettempdir()) / "dpig-openapi-only"
schema = schemathesis.openapi.from_dict(create_app(Settings.from_values(home=_home)).openapi())


@pytest.fixture
def fuzz_app(make_settings: Callable[..., Settings]) -> Iterator[FastAPI]:
    """The app on the test database; few items per job keep generated jobs to few chunks."""
    yield create_app(make_settings(max_items_per_job=1000))
    try:  # schemathesis keeps an app's lifespan running until exit otherwise
        from schemathesis.python.asgi import shutdown_lifespans
    except ImportError:  # pragma: no cover - another schemathesis version
        return
    shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: Any, fuzz_app: FastAPI, fuzz_auth: dict[str, str]) -> None:
    case.call_and_validate(app=fuzz_app, headers=fuzz_auth, checks=[not_a_server_error])


@pytest.fixture
def fuzz_auth(fuzz_app: FastAPI, add_key: Callable[[str], tuple[str, int]]) -> dict[str, str]:
    return {"Authorization": f"Bearer {add_key('fuzz')[0]}"}
