"""The HTTP server in front of an engine: `make_app` builds the FastAPI app, `cli.main` runs it."""

from .app import make_app

__all__ = ["make_app"]
