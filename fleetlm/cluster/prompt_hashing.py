"""The ingress's view of a prompt for prefix-aware routing: its chained block hashes.

The prefix policies (`router.policy: precise_prefix / approx_prefix`) match a prompt's
leading KV blocks against what each replica caches, so the ingress must see the prompt as
the engines do: the same tokens (the chat template applied, as `LLMServer` applies it; the
same tokenizer) and the same chained block hashes (`hash_prompt_blocks`: the engines' block
size and seed). The tokenizer is loaded on first use, off the event loop, once the replicas
have made the model's files ready; hashing also runs off the event loop.

Chat requests with tools are tokenized without the tool rendering `LLMServer` does for
templates that ignore tools, so their hashes may miss: such a prompt is routed by load.
"""

from __future__ import annotations

import asyncio
import threading

import jinja2

from fleetlm.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.executor.block_pool import hash_prompt_blocks


class PromptHasher:
    def __init__(self, model: str, tokenizer: str | None, block_size: int,
                 hash_seed: int = 0) -> None:
        self.model = model
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.hash_seed = hash_seed
        self._tokenizer = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # bound into the ingress: pickled without lock/tokenizer
        return {**self.__dict__, "_tokenizer": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    async def block_hashes(self, body: ChatCompletionRequest | CompletionRequest
                           ) -> tuple[int, ...]:
        """The prompt's block hashes (a completion's first prompt); () if it cannot be
        tokenized here (the replica then answers the client's mistake)."""
        return await asyncio.to_thread(self._hash, body)

    def _hash(self, body: ChatCompletionRequest | CompletionRequest) -> tuple[int, ...]:
        try:
            token_ids = self._token_ids(body)
        except (ValueError, jinja2.TemplateError):
            return ()
        return tuple(hash_prompt_blocks(token_ids, self.block_size, self.hash_seed))

    def _token_ids(self, body: ChatCompletionRequest | CompletionRequest) -> list[int]:
        tokenizer = self._load()
        if isinstance(body, ChatCompletionRequest):
            text = tokenizer.apply_chat_template(
                body.messages_as_dicts(), tokenize=False,
                add_generation_prompt=body.add_generation_prompt)
            return tokenizer.encode(text, add_special_tokens=False)
        prompt = body.prompts()[0]
        return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _load(self):
        with self._lock:
            if self._tokenizer is None:
                from fleetlm.executor.weights import (
                    load_tokenizer,
                    resolve_model,
                    resolve_tokenizer,
                )

                self._tokenizer = load_tokenizer(
                    resolve_tokenizer(self.tokenizer_name, resolve_model(self.model)))
            return self._tokenizer
