"""The consent page and the redirect back to the client: plain HTML, no assets, drivable by a form post."""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import errors
from .state import SCOPES

SCOPE_LABELS = {
    "read": "View data about your public profile",
    "read_all": "View data about your private routes, segments and events",
    "profile:read_all": "View your complete profile",
    "profile:write": "Update your weight and FTP, and star or unstar segments",
    "activity:read": "View data about your activities (Everyone and Followers visibility)",
    "activity:read_all": "View data about your activities, including Only You activities",
    "activity:write": "Upload activities and edit them",
}


def parse_scopes(raw: str | None) -> list[str]:
    """Split Strava's comma-separated scope list; missing means `read`, unknown names are an error."""
    scopes: list[str] = []
    for part in (raw or "read").split(","):
        scope = part.strip()
        if not scope or scope in scopes:
            continue
        if scope not in SCOPES:
            raise errors.bad_request("Authorize", "scope")
        scopes.append(scope)
    return scopes or ["read"]


def check_redirect_uri(redirect_uri: str | None) -> str:
    if not redirect_uri or not urlsplit(redirect_uri).scheme:
        raise errors.bad_request("Application", "redirect_uri")
    return redirect_uri


def with_query(url: str, params: list[tuple[str, str]]) -> str:
    """Append parameters to a URL, keeping the ones it already carries (Strava does too)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params]
    return urlunsplit(parts._replace(query=urlencode(query, safe=",:")))


_STYLE = """
body{font-family:system-ui,sans-serif;background:#f7f7fa;margin:0;padding:2rem}
main{max-width:32rem;margin:auto;background:#fff;border-radius:8px;padding:1.5rem 2rem;box-shadow:0 1px 4px #0002}
h1{font-size:1.3rem}label{display:block;margin:.4rem 0}fieldset{border:1px solid #ddd;border-radius:6px}
#approve{background:#fc4c02;color:#fff;border:0;padding:.6rem 1.2rem;border-radius:4px;font-weight:bold}
#deny{background:none;border:1px solid #999;padding:.6rem 1.2rem;border-radius:4px}
.note{color:#666;font-size:.85rem}
"""


def render_consent(
    *,
    app_name: str,
    action: str,
    client_id: str,
    redirect_uri: str,
    approval_prompt: str,
    state: str | None,
    scopes: list[str],
    athlete_id: int,
) -> str:
    """The page a browser (or a test posting the same form) uses to approve or deny the request."""
    e = escape
    hidden = [
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("response_type", "code"),
        ("approval_prompt", approval_prompt),
        ("requested_scope", ",".join(scopes)),
    ]
    if state is not None:
        hidden.append(("state", state))
    hidden_inputs = "\n".join(f'<input type="hidden" name="{e(name)}" value="{e(value)}">' for name, value in hidden)
    checkboxes = "\n".join(
        f'<label><input type="checkbox" name="scope" value="{e(scope)}" checked> '
        f"<code>{e(scope)}</code> — {e(SCOPE_LABELS.get(scope, scope))}</label>"
        for scope in scopes
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Authorize {e(app_name)} — Strava sandbox</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<h1>Authorize {e(app_name)} to connect to Strava</h1>
<p class="note">Strava sandbox: nothing here talks to the real Strava.</p>
<form id="consent" method="post" action="{e(action)}">
{hidden_inputs}
<fieldset>
<legend>{e(app_name)} asks to</legend>
{checkboxes}
</fieldset>
<label for="athlete_id">Athlete id (an existing id reconnects that athlete)</label>
<input type="number" id="athlete_id" name="athlete_id" min="1" value="{athlete_id}">
<p>
<button id="approve" name="decision" value="approve">Authorize</button>
<button id="deny" name="decision" value="deny">Cancel</button>
</p>
</form>
</main>
</body>
</html>
"""
