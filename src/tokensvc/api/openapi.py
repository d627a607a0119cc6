"""The OpenAPI document: FastAPI's, completed with what holds for every route alike.

Routes declare their own problems with `problems.problem_responses(...)`. What the service does for every route of
a kind is declared here once, so that no route can forget it and no declaration can drift from the behaviour:
- the `Problem` schema (and its `ProblemCode` and `ValidationIssue`) in the components, where the routes' problem
  responses point;
- 422 is a `validation_error` problem (the handler in `problems.py`), not FastAPI's `HTTPValidationError`, which the
  service never sends;
- an operation with a JSON body also answers 413 (the body limit), 415 (a body not declared as JSON) and 422;
- array query parameters take the comma-separated form (`?status=expired,expiring_soon`, `explode: false`), as the
  contract writes them (the repeated form is accepted too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from tokensvc.api.problems import PROBLEM_JSON, problem_responses
from tokensvc.schemas import Problem

# FastAPI's own validation schemas: declared by default, never sent by this service.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_JSON_BODY_PROBLEMS = (413, 415, 422)
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})

TAGS: list[dict[str, str]] = [
    {"name": "tokens", "description": "Each user's Strava tokens: import, status, a fresh access token, refresh."},
    {"name": "connect", "description": "Connect with Strava: consent links and browser sessions for your users."},
    {"name": "browser", "description": "Called by browsers with a session (cookie or session token); never a token."},
    {"name": "audit", "description": "The audit trail of each user and the DB-wide counts."},
    {"name": "operations", "description": "Probes, metrics and operator calls."},
    {"name": "webhooks", "description": "Strava's push subscription callback (called by Strava)."},
    {
        "name": "gateway",
        "description": "Strava's API for one user: their token, the refresh rules, the app's shared rate limits.",
    },
]


def operation_id(route: APIRoute) -> str:
    """An operation's id is its endpoint function's name (`get_token_status`), so generated clients read well."""
    return route.name


def install(app: FastAPI) -> None:
    """Complete `app`'s OpenAPI document once, when it is first asked for."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Add what every route shares to FastAPI's `document` (see the module docstring); returns it."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    for path_item in document.get("paths", {}).values():
        for method, operation in path_item.items():
            if method in _HTTP_METHODS:
                _complete_operation(operation)
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    return document


def _complete_operation(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    takes_json = "application/json" in operation.get("requestBody", {}).get("content", {})
    for status in _JSON_BODY_PROBLEMS if takes_json else ():
        responses.setdefault(str(status), problem_responses(status)[status])
    validation = responses.get("422")
    if validation is not None and PROBLEM_JSON not in validation.get("content", {}):
        responses["422"] = problem_responses(422)[422]  # FastAPI's default: not what the service sends
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "query" and _is_array(parameter.get("schema", {})):
            parameter["style"], parameter["explode"] = "form", False


def _is_array(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "array" or any(_is_array(option) for option in schema.get("anyOf", ()))
