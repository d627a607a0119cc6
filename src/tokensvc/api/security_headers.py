"""Headers every response carries: no MIME sniffing, no framing, and a Content-Security-Policy per page.

A page that sets its own policy keeps it (the dashboard's and the docs console's, which lets its own assets run).
Everything else gets `DEFAULT_POLICY`: nothing may load or run but inline styles (the small "connected" pages use
style attributes), forms post only to this origin, and nothing may frame it. The sandbox (the Strava emulator) is
left without a policy: its consent form redirects to whatever app is being tried, as Strava's does.
"""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

from tokensvc.api.asgi import HttpMiddleware

DEFAULT_POLICY = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'"
)
SANDBOX_PREFIX = "/sandbox/"
# What a response that bypasses this layer (the access-token fast path) appends itself.
STATIC_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", DEFAULT_POLICY),
]


class SecurityHeaders(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        with_policy = not scope["path"].startswith(SANDBOX_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if b"x-frame-options" not in names:
                    headers.append((b"x-frame-options", b"DENY"))
                if with_policy and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", DEFAULT_POLICY))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
