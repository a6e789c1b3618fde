"""The OpenAI-compatible HTTP front door: validate, authorize, route, relay.

`OpenAIIngress` parses and checks each request itself (so every error has OpenAI's shape and
never reaches an engine), tokenizes it once, sends it through its handle to the engine
deployment (Serve's request router runs fleetlm's policy: serve_router.py), and relays the
replica's stream (see server.py for its contract). When the replica fails, the request goes
on elsewhere (migration.py); a failed replica gets no requests until it answers healthy again. Each
replica builds its FastAPI app from its own bound methods (`build_fastapi`), so no app lives
in a module global.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from fleetlm.cluster import errors, openapi
from fleetlm.cluster.config import MigrationSection, RouterSection
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.metrics import METRICS_CONTENT_TYPE, render_metrics
from fleetlm.cluster.migration import (
    REPLICA_ERRORS,
    ReplicaStream,
    Resume,
    StreamChunk,
    call_replica,
    is_replica_failure,
    merge_progress,
    retry_delays,
    sse_error,
)
from fleetlm.cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    random_id,
)
from fleetlm.cluster.prompt_hashing import PromptHasher
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.serve_logs import send_fleetlm_logs_to_serve
from fleetlm.cluster.serve_router import routing_table, send

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# A replica that has not answered a health probe by then counts as unhealthy: a dead one
# would otherwise hold /health until Serve has replaced it. A live one answers in
# milliseconds (its engine runs in another thread), even on a loaded 2-core machine.
HEALTH_PROBE_TIMEOUT_S = 0.5
UNARY_TIMEOUT_S = 10.0  # other questions to a replica (model length)
# A live replica answers /metrics in milliseconds; Prometheus gives a whole scrape 10 s.
METRICS_TIMEOUT_S = 2.0
# How long the precise prefix router goes without hearing a replica's KV events before it
# asks (each ask is a Serve call, a millisecond or two of CPU on each side; a busy replica
# sends them unasked with each stream's first chunk), and how long it waits for an answer.
KV_EVENTS_INTERVAL_S = 0.25
KV_EVENTS_TIMEOUT_S = 2.0
# Names the engine replica the router picked for a request (the first, if it migrated), as
# llm-d's gateway names the pod it chose: routing becomes visible per request to clients.
REPLICA_HEADER = "x-fleetlm-replica"


@dataclass(frozen=True)
class _Call:
    """One client request, as every replica it visits is asked it."""

    method: str  # "chat" | "completions"
    body: Any
    request_id: str
    routing: RoutingRequest


class OpenAIIngress:
    def __init__(
        self,
        served_model_name: str,
        server: DeploymentHandle,
        router: str | RouterSection = "least_loaded",
        api_keys: Sequence[str] = (),
        migration: MigrationSection | None = None,
        prefill_server: DeploymentHandle | None = None,
        hasher: PromptHasher | None = None,
    ) -> None:
        """`server`: the engine deployment requests go to (a P/D deployment's decode pool),
        routed by `router` (serve_router.py), or a `LocalHandle` to the engine replica these
        routes run in (`http.ingress: in_replica`, app.py); `prefill_server`: a P/D
        deployment's prefill pool, which the decode replicas call themselves; here it counts
        only for /health and /metrics. `hasher` tokenizes prompts once, here, and gives the prefix-aware policies
        each prompt's block hashes."""
        send_fleetlm_logs_to_serve()
        self.model_name = served_model_name
        # Streams come over Serve's gRPC channel from the replica, not as Ray actor-task items,
        # for less CPU per message (docs/benchmarks.md, "The served path: gRPC hops"); Serve's
        # own throughput-optimized mode makes the same choice for every handle.
        self.server = server.options(stream=True, _by_reference=False)
        self.pools = [server.options(stream=False)]  # every engine deployment, for questions
        if prefill_server is not None:
            self.pools.append(prefill_server.options(stream=False))
        section = router if isinstance(router, RouterSection) else RouterSection(policy=router)
        self.table = routing_table(server.app_name, server.deployment_name, section)
        self.hasher = hasher
        if hasher is not None:
            hasher.preload()  # else the first request waits seconds for transformers' import
        self._kv_events_task: asyncio.Task | None = None  # feeds the router's KV index
        self._kv_heard_at: dict[str, float] = {}  # replica -> when its events last came
        self.api_keys = [key.encode() for key in api_keys]
        self.migration = migration or MigrationSection()
        self._max_model_len: int | None = None
        self._watchers: dict[str, asyncio.Task] = {}  # replica -> its health watcher

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls this in the replica
        return build_fastapi(self)

    # ---- routes --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        return await self._dispatch("chat", body)

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        return await self._dispatch("completions", body)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        if self._max_model_len is None:
            self._max_model_len = await self._ask_any("max_model_len")
        card = ModelCard(id=self.model_name, max_model_len=self._max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def health(self) -> Response:
        """200 if every replica's engine (and each of its workers) lives, else 503 at once:
        a replica that does not answer within HEALTH_PROBE_TIMEOUT_S counts as down."""
        replicas = [(pool, name) for pool in self.pools for name in await self._names(pool)]
        answers = await asyncio.gather(*(self._is_healthy(pool, name) for pool, name in replicas))
        for (pool, name), is_healthy in zip(replicas, answers):
            if pool is self.pools[0]:
                if is_healthy:
                    self.table.set_health(name, True)
                else:
                    self._mark_unhealthy(name)
        if not replicas or not all(answers):
            return _error_response(errors.engine_dead())
        return JSONResponse({"status": "ok", "num_replicas": len(answers)})

    async def metrics(self) -> Response:
        """Every replica that answers within METRICS_TIMEOUT_S; one that does not (dead, being
        replaced) is left out and shows as `fleetlm:replica_up 0`, so one dead replica never
        holds the scrape past Prometheus's own timeout."""
        replicas = [(pool, name) for pool in self.pools for name in await self._names(pool)]
        snapshots = await asyncio.gather(
            *(self._ask(pool, name, "metrics_snapshot", METRICS_TIMEOUT_S)
              for pool, name in replicas),
            return_exceptions=True,
        )  # fmt: skip
        answered, missing = [], []
        for (pool, name), snapshot in zip(replicas, snapshots):
            label = f"{pool.deployment_name}#{name}"  # as app.replica_label
            if isinstance(snapshot, BaseException):
                missing.append((self.model_name, label))
            else:
                answered.append({**snapshot, "replica_id": snapshot["replica_id"] or label})
        routers = [(self.model_name, self.table.snapshot())]
        return Response(render_metrics(answered, missing, routers),
                        media_type=METRICS_CONTENT_TYPE)

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

    async def _dispatch(self, method: str, body: Any) -> Response:
        request_id = random_id("chatcmpl" if method == "chat" else "cmpl")
        call = _Call(method, body, request_id, await self._routing_request(request_id, body))
        attempt, first = await self._start(call, None)
        replica = None if attempt is None else attempt.replica
        headers = {REPLICA_HEADER: replica} if replica else None
        if not isinstance(first, StreamChunk):  # an error or a whole response: nothing follows
            if attempt is not None:
                attempt.close()
            if isinstance(first, OpenAIError):
                raise first
            return JSONResponse(first, headers=headers)
        return StreamingResponse(
            self._relay(call, attempt, first), media_type="text/event-stream", headers=headers
        )

    async def _start(self, call: _Call, resume: Resume | None) -> tuple[ReplicaStream | None, Any]:
        """Send `call` to a replica and wait for its first item. While replicas fail (and
        migration is on), try again with backoff for up to `migration.timeout_s`: a failed
        replica is skipped while others are healthy, else its replacement is waited for.
        Returns (None, the last error) if none took it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.migration.timeout_s
        for delay in retry_delays():
            server = getattr(self.server, call.method)
            stream = send(server, call.body, call.request_id, resume, routing=call.routing)
            attempt = ReplicaStream(self.table, call.request_id, stream)
            try:
                first = await attempt.next()
            except BaseException:
                attempt.close()
                raise
            if not (isinstance(first, OpenAIError) and is_replica_failure(first)):
                replica = attempt.replica
                if isinstance(first, StreamChunk) and first.kv_events and replica is not None:
                    self._apply_kv_events(replica, first.kv_events)
                if replica is not None and not self.table.is_healthy(replica):
                    self.table.set_health(replica, True)
                return attempt, first
            attempt.close()
            self._mark_unhealthy(attempt.replica)
            remaining = deadline - loop.time()
            if not self.migration.is_enabled or remaining <= 0:
                return None, first
            await asyncio.sleep(min(delay, remaining))
        raise AssertionError("retry_delays() never ends")

    async def _relay(self, call: _Call, attempt: ReplicaStream, first: StreamChunk
                     ) -> AsyncIterator[str]:
        """Forward SSE text while recording what the client has; when the replica fails,
        go on from there on another one (up to `migration.max_migrations` times); past that,
        end with an error event and [DONE]. When the client goes away, cancel the request."""
        progress: dict = {}
        item: Any = first
        num_migrations = 0
        try:
            while True:
                if isinstance(item, StreamChunk):
                    yield item.text
                    merge_progress(progress, item)
                    if item.is_last:
                        return
                    item = await attempt.next()
                    continue
                attempt.close()
                if not is_replica_failure(item) or num_migrations >= self.migration.max_migrations:
                    yield sse_error(item)
                    return
                num_migrations += 1
                self._mark_unhealthy(attempt.replica)
                logger.warning("%s: %s failed; moving the stream (migration %d of at most %d)",
                               call.request_id, attempt.replica, num_migrations,
                               self.migration.max_migrations)
                resumed, item = await self._start(call, Resume(progress, num_migrations))
                if resumed is None:
                    yield sse_error(item)
                    return
                attempt = resumed
        finally:
            attempt.close()

    async def _routing_request(self, request_id: str, body: Any) -> RoutingRequest:
        if isinstance(body, ChatCompletionRequest):
            text = "\n".join(m.text() for m in body.messages)
        else:
            text = body.prompt if isinstance(body.prompt, str) else ""
        if self.hasher is None:
            return RoutingRequest(request_id, text)
        index = self.table.router.kv_index
        token_ids, block_hashes = await self.hasher.tokenize(body)
        if index is None:
            return RoutingRequest(request_id, text, block_hashes, token_ids)
        if self._kv_events_task is None:
            self._kv_events_task = asyncio.create_task(self._follow_kv_events())
        with self.table.lock:
            cursors = index.cursors()
        return RoutingRequest(request_id, text, block_hashes, token_ids, kv_cursors=cursors)

    def _apply_kv_events(self, name: str, reply: dict) -> None:
        """Fold one replica's KV events (asked for, or sent with a stream) into the index."""
        with self.table.lock:
            if self.table.router.replica(name) is not None:
                self.table.router.kv_index.apply(name, reply)
                self._kv_heard_at[name] = time.monotonic()

    async def _follow_kv_events(self) -> None:
        """Mirror every replica's prefix cache into the router's index: ask each replica
        whose events have not come for KV_EVENTS_INTERVAL_S (with a stream, or asked) for
        those since the last reply; a replica that does not answer is dropped from the index
        (its next reply is a snapshot), and one Serve removed is dropped by the router
        (serve_router.py)."""
        index, lock, pool = self.table.router.kv_index, self.table.lock, self.pools[0]
        while True:
            names = await self._names(pool)
            for name in self._kv_heard_at.keys() - set(names):  # replaced or scaled down
                del self._kv_heard_at[name]
            for name in names:
                with lock:
                    heard_at = self._kv_heard_at.get(name)
                    if heard_at is not None and time.monotonic() - heard_at < \
                            KV_EVENTS_INTERVAL_S:
                        continue
                    cursor = index.cursor(name)
                try:
                    reply = await self._ask(pool, name, "kv_events_since", KV_EVENTS_TIMEOUT_S,
                                            *cursor)
                except Exception:  # noqa: BLE001 - dead or being replaced: it holds nothing
                    with lock:
                        if name in index.replicas:
                            index.remove_replica(name)
                    continue
                self._apply_kv_events(name, reply)
            await asyncio.sleep(KV_EVENTS_INTERVAL_S)

    def _mark_unhealthy(self, name: str | None) -> None:
        """Route around replica `name` until it (or its replacement) answers healthy again."""
        if name is None or self.table.set_health(name, False) is None:
            return
        watcher = self._watchers.get(name)
        if watcher is None or watcher.done():
            self._watchers[name] = asyncio.create_task(self._watch(name))

    async def _watch(self, name: str) -> None:
        for delay in retry_delays():
            await asyncio.sleep(delay)
            if name not in self.table.replica_names():  # Serve removed it
                return
            if self.table.is_healthy(name) or await self._is_healthy(self.pools[0], name):
                self.table.set_health(name, True)
                return

    async def _names(self, pool: DeploymentHandle) -> list[str]:
        """The replicas of an engine deployment, as its router knows them. A router is made
        with a handle's first call: until then, one call (anywhere) makes it."""
        table = routing_table(pool.app_name, pool.deployment_name)
        if not table.replica_names():
            try:
                await call_replica(pool, "max_model_len", UNARY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - none up yet: no replicas to name
                return []
        return table.replica_names()

    async def _ask(self, pool: DeploymentHandle, name: str, question: str, timeout_s: float,
                   *args) -> Any:
        """Ask replica `name` of `pool` one of `LLMServer.QUESTIONS`."""
        return await call_replica(pool, "ask", timeout_s, question, *args,
                                  routing=RoutingRequest("", target=name))

    async def _is_healthy(self, pool: DeploymentHandle, name: str) -> bool:
        try:
            return await self._ask(pool, name, "is_healthy", HEALTH_PROBE_TIMEOUT_S) is True
        except Exception:  # noqa: BLE001 - dead, being replaced, or too slow: not healthy
            return False

    async def _ask_any(self, method: str) -> Any:
        """The answer of any replica (Serve's pick)."""
        return await call_replica(self.pools[0], method, UNARY_TIMEOUT_S)


# ---- FastAPI wiring ----------------------------------------------------------------------

_ROUTES = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/completions", "completions"),
    ("GET", "/v1/models", "models"),
    ("GET", "/health", "health"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/", "index"),
]
# The routes parse these themselves (see `_parse`); the OpenAPI schema declares them.
_REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest,
                   "/v1/completions": CompletionRequest}


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


async def _on_openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return _error_response(error)


async def _on_http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error_response(OpenAIError(error.status_code, str(error.detail)))


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error_response(errors.bad_request(str(error)))


async def _on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, REPLICA_ERRORS):  # the replica died; Serve is replacing it
        return _error_response(errors.engine_dead())
    return _error_response(errors.internal_error(error))


def build_fastapi(ingress: OpenAIIngress) -> FastAPI:
    """A FastAPI app whose routes call `ingress`'s bound methods."""
    app = FastAPI(title="fleetlm", version=version("fleetlm"), redoc_url=None)
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    for http_method, path, name in _ROUTES:
        app.add_api_route(path, getattr(ingress, name), methods=[http_method],
                          include_in_schema=path != "/")
    openapi.publish(app, _REQUEST_BODIES, is_authenticated=bool(ingress.api_keys))
    return app


def make_ingress_class() -> type:
    """`OpenAIIngress` for `serve.deployment`: each replica builds its own FastAPI app."""
    return serve.ingress()(OpenAIIngress)
