"""A small engine implementing `EngineClient`, for CPU tests of the serving layer.

Tokens are UTF-8 bytes (ids 0-255) plus EOS (256). Each request generates the letters
"abc...z" cyclically, starting at the letter `len(prompt) % 26`, one token per `step_s`;
the sampled token's logprob is -0.5, alternatives follow with -1, -2, ... It honours
`max_num_seqs` (the rest wait), max_tokens, the context length and stop strings, and keeps
"KV blocks" (`ceil(num_tokens / block_size)` per running request) so tests can watch them
being freed. A prompt containing `CRASH_MARKER` kills the engine; one containing
`DIE_MARKER` kills it after `DIE_AFTER_TOKENS` tokens of its own (unless the request resumes
another replica's output: `resume_token_ids`, which it checks), failing every stream it runs.
`DIE_ONCE_MARKER` followed by a file path does the same only if the file does not exist yet
(and creates it): the first engine to run the request dies, the next serves it. Outputs are
cumulative or deltas, as `SamplingParams.output_kind` asks.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import jinja2

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.outputs import CompletionOutput, RequestOutput
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.sampling_params import SamplingParams

EOS_ID = 256
VOCAB_SIZE = 257
CRASH_MARKER = "__crash_the_engine__"
DIE_MARKER = "__die_mid_stream__"
DIE_ONCE_MARKER = "__die_once_at__"
DIE_AFTER_TOKENS = 4
ROLES = ("system", "user", "assistant")


class ByteTokenizer:
    eos_token_id = EOS_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < EOS_ID).decode(errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        for message in messages:
            if message["role"] not in ROLES:
                raise jinja2.TemplateError(f"unknown role {message['role']!r}")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def expected_text(prompt_len: int, num_tokens: int) -> str:
    """What the fake engine generates for a prompt of `prompt_len` tokens."""
    return "".join(chr(ord("a") + (prompt_len + i) % 26) for i in range(num_tokens))


class FakeEngine:
    def __init__(self, config: EngineConfig, step_s: float = 0.002, max_model_len: int = 512):
        self.model_name = config.model.model
        self.max_model_len = config.model.max_model_len or max_model_len
        self.tokenizer = ByteTokenizer()
        self.step_s = step_s
        self.block_size = config.cache.block_size
        self.num_blocks = 4096
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.is_healthy = True
        self._num_tokens: dict[str, int] = {}  # running request -> tokens held in "KV"
        self._num_waiting = 0
        self._slot_freed = asyncio.Condition()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self.requests: list[tuple[str, SamplingParams]] = []  # (request id, params) as sent

    def stats(self) -> EngineStats:
        used = sum(math.ceil(n / self.block_size) for n in self._num_tokens.values())
        return EngineStats(
            num_running=len(self._num_tokens),
            num_waiting=self._num_waiting,
            kv_cache_usage=used / self.num_blocks,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )

    async def abort(self, request_id: str) -> None:
        await self._release(request_id)

    async def shutdown(self) -> None:
        self.is_healthy = False

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, resume_token_ids: list[int] | None = None):
        self.requests.append((request_id, sampling_params))
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, sampling_params)
        resume = list(resume_token_ids or ())
        if resume and resume != [ord(c) for c in expected_text(len(token_ids), len(resume))]:
            raise ValueError("resume_token_ids are not what this prompt generates")
        if not self.is_healthy:
            raise RuntimeError("the fake engine is dead")
        if isinstance(prompt, str) and CRASH_MARKER in prompt:
            self.is_healthy = False
            raise RuntimeError("the fake engine crashed on purpose")
        dies = isinstance(prompt, str) and not resume and (
            DIE_MARKER in prompt or _is_first_to_die(prompt))
        await self._admit(request_id, len(token_ids) + len(resume))
        try:
            async for output in self._run(prompt, token_ids, sampling_params, request_id,
                                          resume, dies):  # fmt: skip
                yield output
        finally:
            await self._release(request_id)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, over the context length {self.max_model_len}"
            )
        params.validate_for_model(VOCAB_SIZE)

    async def _admit(self, request_id: str, num_prompt_tokens: int) -> None:
        self._num_waiting += 1
        try:
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: len(self._num_tokens) < self.max_num_seqs)
        finally:
            self._num_waiting -= 1
        self._num_tokens[request_id] = num_prompt_tokens
        self._num_prompt_tokens += num_prompt_tokens

    async def _release(self, request_id: str) -> None:
        if self._num_tokens.pop(request_id, None) is not None:
            async with self._slot_freed:
                self._slot_freed.notify_all()

    async def _run(self, prompt, token_ids, params: SamplingParams, request_id: str,
                   resume: list[int], dies: bool):
        limit = self.max_model_len - len(token_ids)
        max_tokens = min(params.max_tokens or limit, limit)
        text = expected_text(len(token_ids), max_tokens)
        out = CompletionOutput(index=0, text=text[: len(resume)], token_ids=resume,
                               logprobs=None)  # fmt: skip
        if params.logprobs is not None:
            out.logprobs = []
        sent = CompletionOutput(0, "", [], [])  # what earlier deltas held
        for i in range(len(resume), max_tokens):
            await asyncio.sleep(self.step_s)
            if dies and i == DIE_AFTER_TOKENS:
                self.is_healthy = False
            if not self.is_healthy:
                raise RuntimeError("the fake engine died mid-stream")
            token = ord(text[i])
            out.token_ids = out.token_ids + [token]
            out.text = text[: i + 1]
            if out.logprobs is not None:
                out.logprobs = out.logprobs + [_position(token, params.logprobs)]
            self._num_tokens[request_id] += 1
            self._num_generation_tokens += 1
            out.finish_reason = self._finish_reason(out, params, i + 1 == max_tokens)
            completion = CompletionOutput(**vars(out))
            if params.is_delta:
                completion = _delta(completion, sent, params.stop)
            yield RequestOutput(
                request_id=request_id,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=token_ids,
                outputs=[completion],
                finished=out.finish_reason is not None,
                prompt_logprobs=_prompt_logprobs(token_ids, params.prompt_logprobs),
                is_delta=params.is_delta,
            )
            if out.finish_reason is not None:
                return

    @staticmethod
    def _finish_reason(out: CompletionOutput, params: SamplingParams, is_last: bool):
        for stop in params.stop:
            if out.text.endswith(stop):
                out.text = out.text[: len(out.text) - len(stop)]
                out.stop_reason = stop
                return "stop"
        return "length" if is_last else None


def _delta(out: CompletionOutput, sent: CompletionOutput, stop: list[str]) -> CompletionOutput:
    """What `out` adds to `sent` (the deltas so far, concatenated), which grows by it. Until
    the end, text that a stop string could still cut is held back, as the real engine's
    detokenizer does, since a delta cannot be taken back."""
    num_held_back = 0 if out.finished else max((len(s) - 1 for s in stop), default=0)
    end = max(len(sent.text), len(out.text) - num_held_back)
    delta = CompletionOutput(
        0, out.text[len(sent.text):end], out.token_ids[len(sent.token_ids):],
        None if out.logprobs is None else out.logprobs[len(sent.logprobs):],
        out.finish_reason, out.stop_reason)
    sent.extend(delta)
    return delta


def _is_first_to_die(prompt: str) -> bool:
    match = re.search(re.escape(DIE_ONCE_MARKER) + r"(\S+)", prompt)
    if match is None:
        return False
    try:
        Path(match.group(1)).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def _position(token: int, num_top: int) -> list[tuple[int, float]]:
    alternatives = [(t, -1.0 - i) for i, t in enumerate(range(num_top))]
    return [(token, -0.5)] + alternatives


def _prompt_logprobs(token_ids: list[int], num_top: int | None):
    if num_top is None:
        return None
    return [None] + [_position(t, num_top) for t in token_ids[1:]]
