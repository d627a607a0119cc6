"""The sandbox's routers, one per resource: OAuth, the athlete and activities API, push subscriptions, control."""
