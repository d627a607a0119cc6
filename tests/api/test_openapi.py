"""/openapi.json read the way generators and Swagger read it: every operation, whoever added it, is held to the same
rules, so a new route that forgets one fails here with its name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings, run_isolated
from tokensvc import errors
from tokensvc.app import create_app
from tokensvc.schemas import ProblemCode

PROBLEM_REF = "#/components/schemas/Problem"
METHODS = ("get", "put", "post", "delete", "patch")
# The browser endpoint answers its 401/503 in the shape of the dashboard it replaces (CONTRACT.md), and readiness
# in a probe's own shape, not as problems.
DASHBOARD_SHAPED = {
    ("post", "/proactive-token-refresh", "401"): "BrowserFailure",
    ("post", "/proactive-token-refresh", "503"): "BrowserFailure",
    ("get", "/readyz", "503"): "Health",
}
CONTRACT_CODES = {
    "unauthorized",
    "not_found",
    "validation_error",
    "payload_too_large",
    "invalid_state",
    "tokens_missing",
    "reauth_required",
    "provider_unavailable",
    "provider_rate_limited",
    # v1.1
    "insufficient_scope",
    "strava_rate_limited",
    "stale_import",
    "athlete_in_use",
    "connect_mismatch",
    "unsupported_media_type",
    "too_many_requests",
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as a client downloads it, from an app with the sandbox mounted (as `serve --sandbox` runs)."""
    app = create_app(make_settings("sqlite+aiosqlite:///:memory:"), sandbox=True)

    async def fetch() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            response = await http.get("/openapi.json")
            assert response.status_code == 200
            spec: dict[str, Any] = response.json()
            return spec

    spec: dict[str, Any] = run_isolated(fetch())
    return spec


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema, its `$ref` followed (an optional body is `anyOf` the model and null)."""
    refs = [option for option in schema.get("anyOf", ()) if "$ref" in option]
    ref = refs[0]["$ref"] if refs else schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


def every_error(document: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status[0] in "45":
                yield method, path, status, response


GATEWAY_PATH = "/v1/users/{user_id}/strava/"
CALLBACK_PATH = "/v1/oauth/strava/callback"


class TestProblemResponses:
    def test_every_error_response_is_a_problem_under_problem_json(self, document: dict[str, Any]) -> None:
        """Every 4xx/5xx of every operation declares application/problem+json with the Problem schema, and no
        other media type (the dashboard-shaped answers of the browser endpoint aside)."""
        wrong = []
        for method, path, status, response in every_error(document):
            if (method, path, status) in DASHBOARD_SHAPED:
                continue
            content = response.get("content", {})
            if path.startswith(GATEWAY_PATH):  # Strava's own answers pass through beside the service's problems
                content = {k: v for k, v in content.items() if k not in ("application/json", "*/*")}
            if (method, path, status) == ("get", CALLBACK_PATH, "409"):  # the athlete-capacity page, for people
                content = {k: v for k, v in content.items() if k != "text/html"}
            if (
                set(content) != {"application/problem+json"}
                or content["application/problem+json"].get("schema", {}).get("$ref") != PROBLEM_REF
            ):
                wrong.append(f"{method.upper()} {path} {status}: {sorted(content)}")
        assert wrong == []

    def test_the_other_shaped_answers_are_declared_with_their_own_schema(self, document: dict[str, Any]) -> None:
        """The browser endpoint's 401 and 503 keep the contract's shape (BrowserFailure), readiness its own."""
        for (method, path, status), model in DASHBOARD_SHAPED.items():
            content = document["paths"][path][method]["responses"][status]["content"]
            assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"

    def test_every_error_response_has_an_example_of_its_status(self, document: dict[str, Any]) -> None:
        """Swagger and generated docs show a real problem body, not `"string"`; each example's status is its own."""
        for method, path, status, response in every_error(document):
            if (method, path, status) in DASHBOARD_SHAPED:
                continue
            examples = response["content"]["application/problem+json"].get("examples", {})
            assert examples, f"{method.upper()} {path} {status}"
            assert {example["value"]["status"] for example in examples.values()} == {int(status)}

    def test_401s_name_the_bearer_scheme_and_503s_say_when_to_retry(self, document: dict[str, Any]) -> None:
        """WWW-Authenticate on every 401, Retry-After on every 503 (and 429), as the answers carry them."""
        for method, path, status, response in every_error(document):
            headers = response.get("headers", {})
            if status == "401":
                assert "WWW-Authenticate" in headers, f"{method.upper()} {path}"
            if status in ("429", "503"):
                assert "Retry-After" in headers, f"{method.upper()} {path} {status}"

    def test_every_json_body_can_be_refused_as_413_415_and_422(self, document: dict[str, Any]) -> None:
        """What the body limit, the media type check and validation answer is declared wherever a body is taken."""
        for method, path, operation in operations(document):
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert {"413", "415", "422"} <= set(operation["responses"]), f"{method.upper()} {path}"

    def test_fastapis_validation_schema_is_not_declared(self, document: dict[str, Any]) -> None:
        """FastAPI's HTTPValidationError is never sent, so it is not in the components either."""
        assert "HTTPValidationError" not in document["components"]["schemas"]


class TestProblemSchema:
    def test_the_extension_members_are_declared(self, document: dict[str, Any]) -> None:
        """needs_reauth, authorize_url, reauth_reason, errors, retry_after (and missing_scope) are named, with only
        the standard five required, and unknown members allowed."""
        problem = document["components"]["schemas"]["Problem"]
        assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}
        assert {"needs_reauth", "authorize_url", "reauth_reason", "errors", "retry_after", "missing_scope"} <= set(
            problem["properties"]
        )
        assert problem["properties"]["needs_reauth"]["type"] == "boolean"
        assert problem["additionalProperties"] is True

    def test_code_lists_the_known_values_and_stays_an_open_string(self, document: dict[str, Any]) -> None:
        """`code` is ProblemCode or any string: the contract's codes (v1.1 included) are listed, a new one parses."""
        code = document["components"]["schemas"]["Problem"]["properties"]["code"]
        assert {"$ref": "#/components/schemas/ProblemCode"} in code["anyOf"]
        assert {"type": "string"} in code["anyOf"]
        listed = set(document["components"]["schemas"]["ProblemCode"]["enum"])
        assert listed >= CONTRACT_CODES

    def test_every_code_the_service_can_send_is_listed(self) -> None:
        """Each error class's code is a ProblemCode value: a new error class must be listed there too."""

        def subclasses(cls: type[errors.TokenServiceError]) -> Iterator[type[errors.TokenServiceError]]:
            for sub in cls.__subclasses__():
                yield sub
                yield from subclasses(sub)

        classes: list[type[errors.TokenServiceError]] = [
            errors.TokenServiceError,
            *subclasses(errors.TokenServiceError),
        ]
        codes = {cls.code for cls in classes}
        assert codes - {code.value for code in ProblemCode} == set()


class TestOperations:
    def test_operation_ids_are_readable_and_unique(self, document: dict[str, Any]) -> None:
        """Snake-case names a generated client can use as function names, none repeated."""
        ids = [operation["operationId"] for _, _, operation in operations(document)]
        assert len(ids) == len(set(ids))
        assert all(op_id.isidentifier() and op_id == op_id.lower() for op_id in ids)

    def test_the_contracts_operations_have_their_names(self, document: dict[str, Any]) -> None:
        """The ids a client of the service API will call."""
        paths = document["paths"]
        assert {
            paths["/v1/users/{user_id}/tokens"]["put"]["operationId"],
            paths["/v1/users/{user_id}/tokens"]["delete"]["operationId"],
            paths["/v1/users/{user_id}/token-status"]["get"]["operationId"],
            paths["/v1/users/{user_id}/access-token"]["get"]["operationId"],
            paths["/v1/users/{user_id}/refresh"]["post"]["operationId"],
            paths["/v1/tokens"]["get"]["operationId"],
        } == {"put_tokens", "delete_tokens", "get_token_status", "get_access_token", "refresh_tokens", "list_tokens"}

    def test_every_operation_has_a_described_tag(self, document: dict[str, Any]) -> None:
        """Operations are grouped, and every group says what it is."""
        described = {tag["name"] for tag in document["tags"] if tag.get("description")}
        for method, path, operation in operations(document):
            assert operation.get("tags"), f"{method.upper()} {path}"
            assert set(operation["tags"]) <= described, f"{method.upper()} {path}"

    def test_the_status_filter_is_an_enum_in_the_comma_form(self, document: dict[str, Any]) -> None:
        """`?status=` takes the four listable statuses (not `missing`), written comma-separated."""
        (status,) = [p for p in document["paths"]["/v1/tokens"]["get"]["parameters"] if p["name"] == "status"]
        assert status["schema"]["type"] == "array"
        assert set(status["schema"]["items"]["enum"]) == {"valid", "expiring_soon", "expired", "needs_reauth"}
        assert (status["style"], status["explode"]) == ("form", False)


class TestSecurity:
    def test_the_service_api_takes_the_api_key_and_the_browser_endpoints_a_session(
        self, document: dict[str, Any]
    ) -> None:
        """Bearer API key on /v1 service operations; a session (cookie or session token) on the browser ones; nothing
        on probes, the OAuth callback and Strava's webhook."""
        schemes = document["components"]["securitySchemes"]
        assert schemes["ApiKey"] == schemes["ApiKey"] | {"type": "http", "scheme": "bearer"}
        assert schemes["SessionCookie"] | {"in": "cookie", "name": "tokensvc_session"} == schemes["SessionCookie"]
        session: list[dict[str, list[str]]] = [{"SessionCookie": []}, {"SessionToken": []}]
        expected: dict[tuple[str, str], list[dict[str, list[str]]] | None] = {
            ("get", "/v1/users/{user_id}/access-token"): [{"ApiKey": []}],
            ("post", "/v1/users/{user_id}/session"): [{"ApiKey": []}],
            ("get", "/v1/stats"): [{"ApiKey": []}],
            ("post", "/proactive-token-refresh"): session,
            ("get", "/v1/me/token-status"): session,
            ("get", "/v1/oauth/strava/authorize"): session,
            ("get", "/v1/oauth/strava/callback"): None,
            ("post", "/v1/webhooks/strava"): None,
            ("get", "/healthz"): None,
        }
        for (method, path), security in expected.items():
            assert document["paths"][path][method].get("security") == security, f"{method.upper()} {path}"
        for method, path, operation in operations(document):
            if "401" in operation["responses"]:
                assert operation.get("security"), f"{method.upper()} {path} answers 401 but names no scheme"


class TestExamples:
    def test_every_json_body_and_answer_has_an_example(self, document: dict[str, Any]) -> None:
        """Request bodies and JSON answers show realistic values, so nothing reads `"string"` and `0`."""
        missing = []
        for method, path, operation in operations(document):
            bodies = [("request", operation.get("requestBody", {}).get("content", {}).get("application/json"))]
            bodies += [
                (status, response.get("content", {}).get("application/json"))
                for status, response in operation["responses"].items()
                if status.startswith("2")
            ]
            for where, media in bodies:
                if media is None or "schema" not in media:
                    continue
                schema = resolve(document, media["schema"])
                if not (media.get("examples") or media.get("example") or schema.get("examples")):
                    missing.append(f"{method.upper()} {path} {where}")
        assert missing == []
