"""The OpenAI-compatible HTTP front door: validate, authorize, route, relay.

`OpenAIIngress` parses and checks each request itself (so every error has OpenAI's shape and
never reaches an engine), asks the router for a replica, and relays that replica's stream
(see server.py for its contract). Each replica builds its FastAPI app from its own bound
methods (`build_fastapi`), so no app lives in a module global.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.metrics import METRICS_CONTENT_TYPE, render_metrics
from fleetlm.cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    random_id,
)
from fleetlm.cluster.router import ReplicaState, RoutingRequest, build_router

STATIC_DIR = Path(__file__).parent / "static"


class OpenAIIngress:
    def __init__(
        self,
        served_model_name: str,
        servers: Sequence[DeploymentHandle],
        router_policy: str = "least_loaded",
        api_keys: Sequence[str] = (),
    ) -> None:
        self.model_name = served_model_name
        self.servers = [server.options(stream=True) for server in servers]
        self.router = build_router(router_policy, [s.deployment_name for s in servers])
        self.api_keys = [key.encode() for key in api_keys]
        self._max_model_len: int | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls this in the replica
        return build_fastapi(self)

    # ---- routes --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        text = "\n".join(m.text() for m in body.messages)
        return await self._dispatch("chat", body, text)

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        text = body.prompt if isinstance(body.prompt, str) else ""
        return await self._dispatch("completions", body, text)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        if self._max_model_len is None:
            self._max_model_len = await self._unary(0, "max_model_len")
        card = ModelCard(id=self.model_name, max_model_len=self._max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def health(self) -> Response:
        answers = await asyncio.gather(
            *(self._unary(i, "is_healthy") for i in range(len(self.servers))),
            return_exceptions=True,
        )
        for replica, answer in zip(self.router.replicas, answers):
            replica.is_healthy = answer is True
        if not all(answer is True for answer in answers):
            return _error_response(errors.engine_dead())
        return JSONResponse({"status": "ok", "num_replicas": len(answers)})

    async def metrics(self) -> Response:
        snapshots = await asyncio.gather(
            *(self._unary(i, "metrics_snapshot") for i in range(len(self.servers)))
        )
        return Response(render_metrics(snapshots), media_type=METRICS_CONTENT_TYPE)

    async def index(self) -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise HTTPException(HTTPStatus.NOT_FOUND, "the chat page is not installed")
        return FileResponse(page, media_type="text/html")

    # ---- request path --------------------------------------------------------------------

    async def _parse(self, request: Request, body_type: type[BaseModel]) -> Any:
        self._authorize(request)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise errors.bad_request(f"The body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise errors.bad_request("The body must be a JSON object.")
        try:
            body = body_type.model_validate(data)
            body.to_sampling_params()  # reject bad sampling values before touching a replica
        except ValidationError as e:
            raise errors.from_validation_error(e) from None
        except ValueError as e:
            raise errors.bad_request(str(e), param=str(e).split(" ", 1)[0]) from None
        if body.model is not None and body.model != self.model_name:
            raise errors.model_not_found(body.model)
        return body

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token_bytes = token.strip().encode()
        is_valid = scheme.lower() == "bearer" and any(
            hmac.compare_digest(token_bytes, key) for key in self.api_keys
        )
        if not is_valid:
            raise errors.unauthorized()

    async def _dispatch(self, method: str, body: Any, prompt_text: str) -> Response:
        request_id = random_id("chatcmpl" if method == "chat" else "cmpl")
        replica = self.router.pick(RoutingRequest(request_id, prompt_text))
        self.router.on_start(replica)
        stream = getattr(self.servers[replica.index], method).remote(body, request_id)
        try:
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            self.router.on_finish(replica)
            raise
        if not isinstance(first, str):  # an error or a whole response: nothing more follows
            self.router.on_finish(replica)
            if isinstance(first, OpenAIError):
                raise first
            return JSONResponse(first)
        return StreamingResponse(
            self._relay(first, stream, replica), media_type="text/event-stream"
        )

    async def _relay(self, first: str, stream, replica: ReplicaState) -> AsyncIterator[str]:
        """Forward SSE text; when the client goes away, cancel the replica's request."""
        is_done = False
        try:
            yield first
            async for text in stream:
                yield text
            is_done = True
        finally:
            if not is_done:
                stream.cancel()
            self.router.on_finish(replica)

    async def _unary(self, index: int, method: str) -> Any:
        """Call a plain (non-streaming) method of replica `index`."""
        handle = self.servers[index].options(stream=False)
        return await getattr(handle, method).remote()


# ---- FastAPI wiring ----------------------------------------------------------------------

_ROUTES = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/completions", "completions"),
    ("GET", "/v1/models", "models"),
    ("GET", "/health", "health"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/", "index"),
]


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


async def _on_openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return _error_response(error)


async def _on_http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error_response(OpenAIError(error.status_code, str(error.detail)))


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error_response(errors.bad_request(str(error)))


async def _on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, RayActorError):  # the replica died; Serve is replacing it
        return _error_response(errors.engine_dead())
    return _error_response(errors.internal_error(error))


def build_fastapi(ingress: OpenAIIngress) -> FastAPI:
    """A FastAPI app whose routes call `ingress`'s bound methods."""
    app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    for http_method, path, name in _ROUTES:
        app.add_api_route(path, getattr(ingress, name), methods=[http_method])
    return app


def make_ingress_class() -> type:
    """`OpenAIIngress` for `serve.deployment`: each replica builds its own FastAPI app."""
    return serve.ingress()(OpenAIIngress)
