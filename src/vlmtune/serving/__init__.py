"""The OpenAI-compatible HTTP server."""

from vlmtune.serving.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
