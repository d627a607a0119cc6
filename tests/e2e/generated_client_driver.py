"""Drives a client that openapi-python-client generated from tokensvc's live /openapi.json, as an app would.

Run by test_generated_client.py with the generator's own interpreter (the generated code needs httpx and attrs,
which that virtualenv has), never imported by the suite: `python generated_client_driver.py PACKAGE_DIR INPUT`.
INPUT is a JSON file naming the service, the key and a sandbox athlete's answer; what each call returned is
printed as one JSON object on stdout, for the test to check.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any


def load(package: str, module: str) -> Any:
    return importlib.import_module(f"{package}.{module}")


def problem_view(response: Any) -> dict[str, Any]:
    """What a caller reads off a problem answer: the parsed `Problem`'s members, and the headers."""
    problem = response.parsed
    return {
        "status": int(response.status_code),
        "parsed_as": type(problem).__name__,
        "code": str(problem.code.value if hasattr(problem.code, "value") else problem.code),
        "code_is_known": type(problem.code).__name__ == "ProblemCode",
        "needs_reauth": problem.needs_reauth if isinstance(problem.needs_reauth, bool) else None,
        "authorize_url": problem.authorize_url if isinstance(problem.authorize_url, str) else None,
        "reauth_reason": problem.reauth_reason if isinstance(problem.reauth_reason, str) else None,
        "www_authenticate": response.headers.get("www-authenticate"),
    }


def main() -> None:
    package_dir, input_path = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(package_dir.parent))
    package = package_dir.name
    given: dict[str, Any] = json.loads(input_path.read_text())
    client_module = load(package, "client")
    tokens = f"{package}.api.tokens"
    put_tokens = importlib.import_module(f"{tokens}.put_tokens")
    get_token_status = importlib.import_module(f"{tokens}.get_token_status")
    get_access_token = importlib.import_module(f"{tokens}.get_access_token")
    refresh_tokens = importlib.import_module(f"{tokens}.refresh_tokens")
    list_tokens = importlib.import_module(f"{tokens}.list_tokens")
    models = load(package, "models")

    client = client_module.AuthenticatedClient(base_url=given["base_url"], token=given["api_key"], timeout=30)
    user, revoked_user = given["user_id"], given["revoked_user_id"]
    seen: dict[str, Any] = {}

    # The sandbox's answer, pasted as it is into the import body (its `scope` included).
    imported = put_tokens.sync_detailed(user, client=client, body=models.TokenImport.from_dict(given["athlete"]))
    seen["import"] = {
        "status": int(imported.status_code),
        "parsed_as": type(imported.parsed).__name__,
        "token_status": imported.parsed.status.value,
        "scopes": list(imported.parsed.scopes),
        "athlete_id": imported.parsed.athlete_id,
    }
    status = get_token_status.sync_detailed(user, client=client)
    seen["status"] = {
        "status": int(status.status_code),
        "parsed_as": type(status.parsed).__name__,
        "token_status": status.parsed.status.value,
        "expires_in": status.parsed.expires_in,
    }
    token = get_access_token.sync_detailed(user, client=client, min_ttl=900)
    seen["access_token"] = {
        "status": int(token.status_code),
        "parsed_as": type(token.parsed).__name__,
        "access_token": token.parsed.access_token,
        "expires_in": token.parsed.expires_in,
        "cache_control": token.headers.get("cache-control"),
    }
    forced = refresh_tokens.sync_detailed(user, client=client, force=True)
    seen["forced_refresh"] = {
        "status": int(forced.status_code),
        "parsed_as": type(forced.parsed).__name__,
        "refreshed": forced.parsed.refreshed,
        "token_status": forced.parsed.token_status.status.value,
    }
    listed = list_tokens.sync_detailed(
        client=client, status=[models.ListTokensStatusItem.VALID, models.ListTokensStatusItem.EXPIRED]
    )
    seen["list"] = {
        "status": int(listed.status_code),
        "user_ids": [item.user_id for item in listed.parsed.items],
    }
    seen["missing_409"] = problem_view(get_access_token.sync_detailed("never-connected", client=client))
    seen["reauth_409"] = problem_view(refresh_tokens.sync_detailed(revoked_user, client=client, force=True))
    wrong_key = client_module.AuthenticatedClient(base_url=given["base_url"], token="not-a-key", timeout=30)
    seen["unauthorized_401"] = problem_view(get_token_status.sync_detailed(user, client=wrong_key))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
