"""Schemathesis against a running `tokensvc serve --sandbox`: every operation its /openapi.json declares (whatever
routes exist), positive and negative data, with the API key and a browser session. Zero 5xx, and every response
matches its declared status codes, content types and schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import run_isolated
from tests.e2e.processes import Process, start_service, wait_ready
from tokensvc.config import SANDBOX_API_KEY
from tokensvc.service.sessions import COOKIE_NAME

pytestmark = pytest.mark.fuzz

# Bounded and derandomized: the same examples on every run, about a minute for the whole API.
MAX_EXAMPLES = 60
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SEEDED_USER = "fuzz-user"  # the browser session's user, and a user with tokens


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """`tokensvc serve --sandbox` on SQLite in a temporary directory, as a real process on a free port."""
    log_dir: Path = tmp_path_factory.mktemp("fuzz")
    process = start_service("fuzz", log_dir, {"TOKENSVC_LOG_LEVEL": "WARNING"}, "--sandbox")
    try:
        run_isolated(wait_ready(process))
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(service: Process) -> Iterator[requests.Session]:
    """Every call carries the API key and the cookie of a browser session (service routes ignore the cookie)."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {SANDBOX_API_KEY}"
        minted = session.post(f"{service.url}/v1/users/{SEEDED_USER}/session", timeout=10)
        minted.raise_for_status()
        session.cookies.set(COOKIE_NAME, minted.json()["session_token"])
        yield session


def seed(service: Process, http: requests.Session) -> None:
    """(Re)connect SEEDED_USER: an athlete in the sandbox whose token is inside the refresh buffer, imported."""
    athlete = http.post(f"{service.url}/sandbox/strava/_control/athletes", json={"expires_in": 600}, timeout=10)
    athlete.raise_for_status()
    pair = {k: athlete.json()[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
    # replace: a generated PUT may have stored a pair expiring later (else 409 stale_import), or another athlete
    http.put(
        f"{service.url}/v1/users/{SEEDED_USER}/tokens", params={"replace": "true"}, json=pair, timeout=10
    ).raise_for_status()


@pytest.fixture(scope="module")
def api_schema(service: Process) -> BaseSchema:
    """The running service's own /openapi.json: whatever routes exist are what is tested."""
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", timeout=10)
    # The API key as a configured header: schemathesis then leaves it out of negative generation, instead of
    # calling a case negative for an Authorization it made up while the session's valid one was sent.
    schema.config.update(base_url=service.url, headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"})
    # Unknown query parameters are ignored, as HTTP APIs do (the contract does not ask to refuse them); negative
    # data means invalid values of the declared parameters and bodies.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


def fuzz_operation(
    operation: APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    http: requests.Session,
    *,
    user_id: str | None = None,
) -> list[str]:
    """Run one operation's examples in one mode (for one stored `user_id`, if given); every distinct failure,
    described (the run goes on after one)."""
    failures: dict[str, str] = {}
    label = f"{operation.label} [{mode.value}{', user ' + user_id if user_id else ''}]"

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same examples on every run: CI is not flaky, a failure reproduces
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: bounded time
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=mode, path_parameters={"user_id": user_id} if user_id else None)
    )
    def run(case: Case[Any]) -> None:
        try:
            case.call_and_validate(session=http, checks=CHECKS, timeout=30)
        except (FailureGroup, AssertionError, requests.RequestException) as exc:  # collected, reported below
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failures.setdefault(summary, f"{label}: {exc}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # An operation without parameters or body (e.g. /healthz) has no invalid input to make.
    return list(failures.values())


def test_every_operation_answers_as_declared(api_schema: BaseSchema, service: Process, http: requests.Session) -> None:
    """No 5xx; status code, content type and body as the OpenAPI declares; invalid input rejected with a 4xx.

    Random user ids are almost never stored, so each per-user operation also runs for a user that has tokens
    (re-seeded first: a generated PUT or DELETE may have replaced them), reaching its success and Strava paths.
    """
    seed(service, http)
    operations = []
    for result in api_schema.get_all_operations():
        if not isinstance(result, Ok):
            pytest.fail(f"an operation in the service's OpenAPI is not valid: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 10, "the service's OpenAPI lists fewer operations than the contract has"
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += fuzz_operation(operation, mode, http)
        if "{user_id}" in operation.path:
            seed(service, http)
            failures += fuzz_operation(operation, GenerationMode.POSITIVE, http, user_id=SEEDED_USER)
    assert not failures, "\n\n".join(failures)
