"""Strava's webhook callback: the subscription check and push events. No API key: Strava calls it, and what it
says is checked with Strava before anything changes (see service/webhooks.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from tokensvc.api.problems import problem_responses
from tokensvc.schemas import HubChallenge, StravaEvent, WebhookAck
from tokensvc.service.webhooks import StravaWebhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


async def get_webhooks(request: Request) -> StravaWebhooks:
    webhooks: StravaWebhooks = request.app.state.webhooks
    return webhooks


WebhooksDep = Annotated[StravaWebhooks, Depends(get_webhooks)]


@router.get("/strava", response_model=HubChallenge, responses=problem_responses(403))
async def check_strava_subscription(
    webhooks: WebhooksDep,
    mode: Annotated[Literal["subscribe"], Query(alias="hub.mode")],
    challenge: Annotated[str, Query(alias="hub.challenge", max_length=256)],
    verify_token: Annotated[str, Query(alias="hub.verify_token", max_length=256)],
) -> HubChallenge:
    """Strava's subscription check: echo `hub.challenge` when `hub.verify_token` is ours, else 403."""
    return HubChallenge(challenge=webhooks.challenge(verify_token=verify_token, challenge=challenge))


@router.post("/strava", response_model=WebhookAck, responses=problem_responses(503))
async def receive_strava_event(event: StravaEvent, webhooks: WebhooksDep) -> WebhookAck:
    """A Strava push event: a deauthorization is stored before the 200 and confirmed with Strava in the
    background; other events are acknowledged and ignored."""
    await webhooks.receive(event)
    return WebhookAck()
