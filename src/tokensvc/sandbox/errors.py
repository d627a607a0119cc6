"""Strava's error bodies, so clients under test classify failures exactly as they would against Strava."""

from __future__ import annotations

from typing import TypedDict

from fastapi.responses import JSONResponse


class ErrorDetail(TypedDict):
    resource: str
    field: str
    code: str


class ErrorBody(TypedDict):
    message: str
    errors: list[ErrorDetail]


def error_body(message: str, resource: str, field: str, code: str) -> ErrorBody:
    """Build the `{"message", "errors": [...]}` shape every Strava error uses."""
    return {"message": message, "errors": [{"resource": resource, "field": field, "code": code}]}


class StravaError(Exception):
    """A Strava-style failure raised by the world and rendered verbatim by the routes."""

    def __init__(self, status: int, message: str, resource: str, field: str, code: str) -> None:
        super().__init__(f"{status} {resource}/{field}/{code}")
        self.status = status
        self.body = error_body(message, resource, field, code)

    def response(self) -> JSONResponse:
        return JSONResponse(dict(self.body), status_code=self.status)


def bad_request(resource: str, field: str, code: str = "invalid") -> StravaError:
    return StravaError(400, "Bad Request", resource, field, code)


def invalid_client_id() -> StravaError:
    return bad_request("Application", "client_id")


def bad_client_secret() -> StravaError:
    return StravaError(401, "Authorization Error", "Application", "", "invalid")


def invalid_code() -> StravaError:
    return bad_request("AuthorizationCode", "code")


def expired_code() -> StravaError:
    return bad_request("AuthorizationCode", "", "expired")


def invalid_refresh_token() -> StravaError:
    return bad_request("RefreshToken", "refresh_token")


def invalid_access_token() -> StravaError:
    return StravaError(401, "Authorization Error", "Athlete", "access_token", "invalid")


RATE_LIMIT_BODY = error_body("Rate Limit Exceeded", "Application", "rate limit", "exceeded")


def rate_limited() -> StravaError:
    return StravaError(429, "Rate Limit Exceeded", "Application", "rate limit", "exceeded")


def missing_permission(field: str) -> StravaError:
    """The token is valid but its grant lacks a scope (`activity:read_permission`, `activity:write_permission`)."""
    return StravaError(401, "Authorization Error", "AccessToken", field, "missing")


def not_found(resource: str, field: str = "id") -> StravaError:
    return StravaError(404, "Record Not Found", resource, field, "invalid")


def unknown_path() -> StravaError:
    """What Strava answers for a path it does not serve (FastAPI's `{"detail": …}` would confuse clients)."""
    return not_found("resource", "path")


def method_not_allowed() -> StravaError:
    return StravaError(405, "Method Not Allowed", "resource", "method", "invalid")


def capacity_exceeded() -> StravaError:
    """A code exchange for one athlete more than the application may connect (new apps: 1, self-serve: 10)."""
    return StravaError(403, "Limit of connected athletes exceeded", "Athlete", "", "limit exceeded")
