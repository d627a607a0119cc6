"""Notification settings: a signing secret in the Standard Webhooks format, an http(s) URL, bounded timings."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from tokensvc.config import Settings
from tokensvc.crypto import generate_notify_secret

pytestmark = pytest.mark.usefixtures("no_tokensvc_env")

URL = "https://app.example/hooks/tokensvc"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


class TestNotifySecret:
    def test_a_generated_secret_is_accepted(self) -> None:
        """`tokensvc gen-key --notify` makes what the settings accept."""
        secret = generate_notify_secret()
        loaded = settings(notify_url=URL, notify_secret=secret)
        assert loaded.notify_secret is not None
        assert loaded.notify_secret.get_secret_value() == secret

    @pytest.mark.parametrize(
        ("secret", "complaint"),
        [
            ("not-a-whsec-secret-at-all-but-long-enough", "must start with 'whsec_'"),
            ("whsec_***not*base64***", "not valid base64"),
            ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 random bytes, got 5"),
            ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24 to 64 random bytes, got 65"),
        ],
    )
    def test_a_malformed_secret_is_refused_saying_what_to_set(self, secret: str, complaint: str) -> None:
        """The message (what `tokensvc serve` prints) names the variable, what is wrong and how to make a good one;
        it never echoes the secret."""
        with pytest.raises(ValidationError) as caught:
            settings(notify_url=URL, notify_secret=secret)
        message = "; ".join(error["msg"] for error in caught.value.errors())
        assert "TOKENSVC_NOTIFY_SECRET" in message
        assert complaint in message
        assert "tokensvc gen-key --notify" in message
        assert secret not in message

    def test_a_url_without_a_secret_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="TOKENSVC_NOTIFY_SECRET is not"):
            settings(notify_url=URL)


class TestNotifyUrl:
    @pytest.mark.parametrize("url", ["ftp://app.example/hooks", "app.example/hooks", "http://"])
    def test_anything_but_an_http_url_is_refused(self, url: str) -> None:
        with pytest.raises(ValidationError, match="TOKENSVC_NOTIFY_URL must be an http"):
            settings(notify_url=url, notify_secret=generate_notify_secret())

    def test_timings_default_to_short_polls_and_backoff_from_5_s_to_an_hour(self) -> None:
        loaded = settings()
        assert loaded.notify_url is None
        assert (loaded.notify_poll_seconds, loaded.notify_timeout_seconds) == (1.0, 10.0)
        assert (loaded.notify_backoff_seconds, loaded.notify_backoff_max_seconds) == (5.0, 3600.0)

    def test_timings_come_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TOKENSVC_NOTIFY_POLL_SECONDS", "0.2")
        monkeypatch.setenv("TOKENSVC_NOTIFY_BACKOFF_SECONDS", "0.5")
        loaded = settings()
        assert (loaded.notify_poll_seconds, loaded.notify_backoff_seconds) == (0.2, 0.5)

    @pytest.mark.parametrize("name", ["TOKENSVC_NOTIFY_POLL_SECONDS", "TOKENSVC_NOTIFY_TIMEOUT_SECONDS"])
    def test_a_zero_timing_is_refused(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        monkeypatch.setenv(name, "0")
        with pytest.raises(ValidationError):
            settings()
