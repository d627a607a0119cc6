"""tokensvc: keeps Strava OAuth tokens fresh for every user of an application."""

__version__ = "0.1.0"
