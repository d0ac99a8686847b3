"""The door's FastAPI app: the endpoint families on one :class:`~.door.Door`, every error in OpenAI's shape."""

from __future__ import annotations

from fastapi import FastAPI

from . import chat, completions, errors, models
from .door import Door, RequestIdMiddleware


def create_app(door: Door) -> FastAPI:
    app = FastAPI(title="moemesh", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    for family in (models, completions, chat):
        app.include_router(family.routes(door))
    app.add_middleware(RequestIdMiddleware)
    return app
