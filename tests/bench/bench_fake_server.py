"""Bench test helpers: a fake OpenAI server with known delays and token counts, small tokenizers.

The server runs an aiohttp app on its own event loop in a background thread, bound to a free
port on 127.0.0.1. Every request streams `tokens_per_chunk` tokens per chunk: the first chunk
`ttft_s` after the request arrived, the next ones `tokens_per_chunk * itl_s` apart (on absolute
deadlines, so delays do not drift). It records, with the same `time.perf_counter()` clock the
client uses, when each request arrived and when each chunk was written, and how many requests
were in flight at most.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetlm.bench.client import EndpointConfig, make_session
from fleetlm.bench.prompts import WORD_LIST
from fleetlm.bench.runner import LoadPoint, RunResult, run_load_point, run_warmup
from fleetlm.bench.tokenizer import RawTokenizer
from fleetlm.bench.workloads import Workload

FAKE_MODEL = "fake-model"
FAKE_REPLICA = "replica-a"  # named in x-fleetlm-replica, as fleetlm's ingress names its replicas
TOKEN_TEXT = " tok"  # every generated token; one word, so the word tokenizer counts it as 1


@dataclass(frozen=True)
class FakeBehaviour:
    ttft_s: float = 0.05
    itl_s: float = 0.02  # per token
    tokens_per_chunk: int = 1
    num_output_tokens: int | None = None  # None: the request's max_tokens (ignore_eos honoured)
    usage_completion_offset: int = 0  # reported completion_tokens = generated + offset
    is_usage_sent: bool = True


@dataclass
class ServedRequest:
    path: str
    body: dict
    receive_time: float
    chunk_times: list[float] = field(default_factory=list)  # token chunks only
    end_time: float = 0.0
    peer: tuple | None = None  # client address: the same for requests on one connection


def _last_text(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def _num_words(body: dict) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"])
    return len(body["prompt"].split())


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.behaviour = FakeBehaviour()
        self.served: list[ServedRequest] = []
        self.num_in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def configure(self, behaviour: FakeBehaviour) -> None:
        """Set the behaviour for the next requests and forget earlier ones."""
        self.behaviour = behaviour
        self.served = []
        self.max_in_flight = 0

    def served_for(self, text: str) -> ServedRequest:
        """The one request whose prompt (or last message) ends with `text`."""
        found = [s for s in self.served if _last_text(s.body).endswith(text)]
        assert len(found) == 1, f"{len(found)} requests end with {text[:40]!r}"
        return found[0]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return sock.getsockname()[1]

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": FAKE_MODEL}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        served = ServedRequest(request.path, {}, time.perf_counter(),
                               peer=request.transport.get_extra_info("peername"))
        served.body = await request.json()
        self.served.append(served)
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "x-fleetlm-replica": FAKE_REPLICA})
        await response.prepare(request)
        await self._stream(response, served)
        await response.write_eof()
        return response

    async def _stream(self, response: web.StreamResponse, served: ServedRequest) -> None:
        b, body = self.behaviour, served.body
        is_chat = "messages" in body
        num_tokens = b.num_output_tokens or body["max_tokens"]
        options = body.get("stream_options") or {}
        if is_chat:  # role header first, as vLLM sends it: carries no output
            await _send(response, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        num_sent = 0
        while num_sent < num_tokens:
            await _sleep_until(served.receive_time + b.ttft_s + num_sent * b.itl_s)
            num_chunk = min(b.tokens_per_chunk, num_tokens - num_sent)
            num_sent += num_chunk
            chunk = _content_chunk(TOKEN_TEXT * num_chunk, is_chat)
            if options.get("continuous_usage_stats"):
                chunk["usage"] = _usage(body, num_sent)
            served.chunk_times.append(time.perf_counter())
            await _send(response, chunk)
        if b.is_usage_sent and options.get("include_usage"):
            usage = _usage(body, num_tokens + b.usage_completion_offset)
            await _send(response, {"choices": [], "usage": usage})
        # Leave the in-flight count before the client can see the end of the stream.
        self.num_in_flight -= 1
        served.end_time = time.perf_counter()
        await response.write(b"data: [DONE]\n\n")


def _content_chunk(text: str, is_chat: bool) -> dict:
    if is_chat:
        return {"choices": [{"index": 0, "delta": {"content": text}}]}
    return {"choices": [{"index": 0, "text": text}]}


def _usage(body: dict, num_completion: int) -> dict:
    num_prompt = _num_words(body)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


async def _send(response: web.StreamResponse, chunk: dict) -> None:
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def run_against(server: FakeOpenAIServer, workload: Workload, load: LoadPoint, num_warmups: int = 0,
                seed: int = 0, base_url: str | None = None, **endpoint_options) -> RunResult:
    """One load point against `server` (or `base_url`), after `num_warmups` warm-up requests that
    open the connections it reuses; the server forgets the warm-up requests."""
    config = EndpointConfig(base_url or server.base_url, FAKE_MODEL, **endpoint_options)

    async def warm_up_then_run() -> RunResult:
        async with make_session(config) as session:
            if num_warmups:
                await run_warmup(session, config, workload, num_warmups)
                server.configure(server.behaviour)
            return await run_load_point(session, config, workload, load, seed)

    return asyncio.run(warm_up_then_run())


def make_word_tokenizer() -> RawTokenizer:
    """One token per whitespace-separated word: counts of the fake server's text are exact."""
    vocab = {"[UNK]": 0, "</s>": 1, "tok": 2}
    for word in WORD_LIST:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return RawTokenizer(tokenizer, "words", eos_token_ids=(1,))


def make_bpe_tokenizer() -> RawTokenizer:
    """A tiny byte-level BPE trained here: real merges, so re-encoding can change lengths."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORD_LIST[i:] + WORD_LIST[:i]) for i in range(len(WORD_LIST))]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return RawTokenizer(tokenizer, "tiny-bpe", eos_token_ids=(0,))
