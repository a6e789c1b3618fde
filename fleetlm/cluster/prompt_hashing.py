"""The ingress tokenizes each prompt once: the token ids go to the replica, the chained block
hashes to the router.

The replica then skips the chat template and the tokenizer (`RoutingRequest.
prompt_token_ids`). The prefix policies (`router.policy: precise_prefix / approx_prefix`)
match a prompt's leading KV blocks against what each replica caches, so the ingress must see
the prompt as the engines do: the same tokens (the chat template applied, as `LLMServer`
applies it; the same tokenizer) and the same chained block hashes (`hash_prompt_blocks`: the
engines' block size and seed). The tokenizer is loaded on first use, off the event loop,
once the replicas have made the model's files ready; hashing also runs off the event loop.

Chat requests with tools (which `LLMServer` renders for templates that ignore them) and
completions with `echo` (which repeat the prompt's own text) are left to the replica to
tokenize; a chat with tools is hashed without them, so its hashes may miss, and it is routed
by load. A model whose tokenizer cannot be loaded here (a fake engine's in tests) leaves all
tokenizing to the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import jinja2

from fleetlm.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.executor.block_pool import hash_prompt_blocks

logger = logging.getLogger(__name__)
TokenIds = tuple[tuple[int, ...], ...]


# The block hash encodes token ids with msgpack, which takes integers below 2**64 only; a
# client's id past that (never a real token) must reach the replica's validation, not crash here.
_HASHABLE_TOKEN_LIMIT = 1 << 63


class PromptHasher:
    def __init__(self, model: str, tokenizer: str | None, block_size: int,
                 hash_seed: int = 0, send_token_ids: bool = True) -> None:
        """`send_token_ids` False: hash only (the replicas' engine has its own tokenizer)."""
        self.model = model
        self.send_token_ids = send_token_ids
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.hash_seed = hash_seed
        self._tokenizer = None
        self._is_unavailable = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # bound into the ingress: pickled without lock/tokenizer
        return {**self.__dict__, "_tokenizer": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def preload(self) -> threading.Thread:
        """Load the tokenizer in a thread of its own now (returned, started); `tokenize` waits
        for it."""
        thread = threading.Thread(target=self._load, name="fleetlm-tokenizer-load", daemon=True)
        thread.start()
        return thread

    async def tokenize(self, body: ChatCompletionRequest | CompletionRequest
                       ) -> tuple[TokenIds | None, tuple[int, ...]]:
        """(every prompt's token ids, or None to leave them to the replica; the first
        prompt's block hashes, () if it cannot be tokenized here: the replica then answers
        the client's mistake)."""
        return await asyncio.to_thread(self._tokenize, body)

    def _tokenize(self, body: ChatCompletionRequest | CompletionRequest
                  ) -> tuple[TokenIds | None, tuple[int, ...]]:
        try:
            prompts = self._token_ids(body)
        except (ValueError, jinja2.TemplateError):
            return None, ()
        if not prompts:
            return None, ()
        if not all(0 <= token < _HASHABLE_TOKEN_LIMIT for token in prompts[0]):
            return None, ()  # no vocabulary's token: the replica answers the 400
        hashes = tuple(hash_prompt_blocks(list(prompts[0]), self.block_size, self.hash_seed))
        if not self.send_token_ids:
            is_exact = False
        elif isinstance(body, ChatCompletionRequest):
            is_exact = not body.tools and not any("tool_calls" in m
                                                  for m in body.messages_as_dicts())
        else:
            is_exact = not body.echo
        return (prompts if is_exact else None), hashes

    def _token_ids(self, body: ChatCompletionRequest | CompletionRequest) -> TokenIds:
        tokenizer = self._load()
        if tokenizer is None:
            return ()
        if isinstance(body, ChatCompletionRequest):
            text = tokenizer.apply_chat_template(
                body.messages_as_dicts(), tokenize=False,
                add_generation_prompt=body.add_generation_prompt)
            return (tuple(tokenizer.encode(text, add_special_tokens=False)),)
        return tuple(tuple(tokenizer.encode(p)) if isinstance(p, str) else tuple(p)
                     for p in body.prompts())

    def _load(self):
        with self._lock:
            if self._tokenizer is None and not self._is_unavailable:
                from fleetlm.executor.weights import (
                    load_tokenizer,
                    resolve_model,
                    resolve_tokenizer,
                )

                try:
                    self._tokenizer = load_tokenizer(
                        resolve_tokenizer(self.tokenizer_name, resolve_model(self.model)))
                except Exception as e:  # noqa: BLE001 - the replicas tokenize instead
                    logger.warning("the ingress cannot load %s's tokenizer (%s); the replicas "
                                   "will tokenize", self.model, e)
                    self._is_unavailable = True
            return self._tokenizer
