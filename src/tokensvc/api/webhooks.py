"""Strava's webhook callback: the subscription check and push events. No API key: Strava calls it, and what it
says is checked with Strava before anything changes (see service/webhooks.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from tokensvc.api.deps import from_app_state
from tokensvc.api.problems import problem_responses
from tokensvc.errors import NotFound
from tokensvc.schemas import HubChallenge, StravaEvent, WebhookAck
from tokensvc.service.webhooks import StravaWebhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


get_webhooks = from_app_state("webhooks", StravaWebhooks)


WebhooksDep = Annotated[StravaWebhooks, Depends(get_webhooks)]


async def bare_path(webhooks: WebhooksDep) -> None:
    """404 at the bare path when the callback has a secret path (before the body is even read)."""
    if not webhooks.path_matches(None):
        raise NotFound("no such webhook callback")


async def secret_path(webhooks: WebhooksDep, secret: Annotated[str, Path(max_length=128)]) -> None:
    """404 at any secret path but the configured one (and at every one when none is configured)."""
    if not webhooks.path_matches(secret):
        raise NotFound("no such webhook callback")


BARE = [Depends(bare_path)]
SECRET = [Depends(secret_path)]
ChallengeMode = Annotated[Literal["subscribe"], Query(alias="hub.mode")]
Challenge = Annotated[str, Query(alias="hub.challenge", max_length=256)]
VerifyToken = Annotated[str, Query(alias="hub.verify_token", max_length=256)]


@router.get("/strava", response_model=HubChallenge, responses=problem_responses(403, 404), dependencies=BARE)
async def check_strava_subscription(
    webhooks: WebhooksDep, mode: ChallengeMode, challenge: Challenge, verify_token: VerifyToken
) -> HubChallenge:
    """Strava's subscription check: echo `hub.challenge` when `hub.verify_token` is ours, else 403 (404 when the
    callback has a secret path)."""
    return HubChallenge(challenge=webhooks.challenge(verify_token=verify_token, challenge=challenge))


@router.get("/strava/{secret}", response_model=HubChallenge, responses=problem_responses(403, 404), dependencies=SECRET)
async def check_strava_subscription_at_secret_path(
    webhooks: WebhooksDep, mode: ChallengeMode, challenge: Challenge, verify_token: VerifyToken
) -> HubChallenge:
    """The subscription check at the secret callback path (TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET); 404 elsewhere."""
    return HubChallenge(challenge=webhooks.challenge(verify_token=verify_token, challenge=challenge))


@router.post("/strava", response_model=WebhookAck, responses=problem_responses(404, 503), dependencies=BARE)
async def receive_strava_event(event: StravaEvent, webhooks: WebhooksDep) -> WebhookAck:
    """A Strava push event: a deauthorization is stored before the 200 and confirmed with Strava in the
    background; other events for a connected athlete are stored before the 200 and forwarded to the app
    (TOKENSVC_NOTIFY_URL); the rest are acknowledged and dropped. 404 when the callback has a secret path."""
    await webhooks.receive(event)
    return WebhookAck()


@router.post("/strava/{secret}", response_model=WebhookAck, responses=problem_responses(404, 503), dependencies=SECRET)
async def receive_strava_event_at_secret_path(event: StravaEvent, webhooks: WebhooksDep) -> WebhookAck:
    """A Strava push event at the secret callback path (TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET); 404 elsewhere."""
    await webhooks.receive(event)
    return WebhookAck()
