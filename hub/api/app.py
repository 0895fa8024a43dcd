"""The hub's HTTP face: ``create_app(settings)``; ``/api/v1``, ``/health``, ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alarms.errors import InvalidTransitionError
from hub.api.commands import router as commands_router
from hub.api.pages import router as pages_router
from hub.api.routes import router
from hub.commands import CommandError
from hub.errors import NotFoundError
from hub.runtime import HubRuntime
from hub.settings import HubSettings

API_PREFIX = "/api/v1"


def create_app(settings: HubSettings, *, runtime: HubRuntime | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts a ``HubRuntime`` unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.runtime = runtime
            yield
            return
        async with HubRuntime(settings) as started:
            app.state.runtime = started
            yield

    app = FastAPI(
        title="Telecare hub",
        version="1",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.include_router(router, prefix=API_PREFIX)
    app.include_router(commands_router, prefix=API_PREFIX)
    app.include_router(pages_router)
    _add_error_handlers(app)

    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> JSONResponse:
        report = await request.app.state.runtime.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        registry = request.app.state.runtime.metrics.registry
        # Rendering walks every series: do it off the event loop that carries alarms.
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(CommandError)
    async def command_refused(_request: Request, exc: CommandError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(InvalidTransitionError)
    async def conflict(_request: Request, exc: InvalidTransitionError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "state": exc.state, "action": exc.action}, status_code=409
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.app.state.runtime.metrics.api_invalid_requests.inc()
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)
