"""The tests-only failpoints stay off unless both switches are set, and refuse what they do not know."""

from __future__ import annotations

import pytest

from tokensvc import failpoints


class TestParse:
    def test_failpoints_named_without_the_enable_switch_are_off(self) -> None:
        """`TOKENSVC_FAILPOINTS` alone does nothing: a stray setting in production cannot kill a process."""
        assert failpoints.parse({"TOKENSVC_FAILPOINTS": "refresh.before_commit=exit"}) == {}

    def test_both_switches_activate_the_named_failpoints(self) -> None:
        """With the enable switch, each `name=action` is active."""
        environ = {"TOKENSVC_ENABLE_FAILPOINTS": "1", "TOKENSVC_FAILPOINTS": " refresh.before_commit=exit , "}
        assert failpoints.parse(environ) == {"refresh.before_commit": "exit"}

    def test_stop_is_an_action(self) -> None:
        """`stop` (freeze with SIGSTOP until SIGCONT) is known beside `exit`."""
        environ = {"TOKENSVC_ENABLE_FAILPOINTS": "1", "TOKENSVC_FAILPOINTS": "refresh.before_store=stop"}
        assert failpoints.parse(environ) == {"refresh.before_store": "stop"}

    def test_an_unknown_action_is_refused(self) -> None:
        """A typo fails loudly instead of silently testing nothing."""
        with pytest.raises(ValueError, match="unknown action"):
            failpoints.parse({"TOKENSVC_ENABLE_FAILPOINTS": "1", "TOKENSVC_FAILPOINTS": "refresh.before_commit=kill"})

    def test_hit_does_nothing_when_disabled(self) -> None:
        """The test process itself runs without failpoints: `hit` returns."""
        failpoints.hit("refresh.before_commit")
