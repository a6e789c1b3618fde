"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(...)`."""

from __future__ import annotations

import itertools
from typing import Self

from tqdm.auto import tqdm

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.outputs import RequestOutput
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.settings import BUILTIN_MODEL, EngineArgs

Conversation = list[dict[str, str]]


def make_engine_config(model: str = BUILTIN_MODEL, speculative_config: dict | None = None,
                       **kwargs) -> EngineConfig:
    """The engine config of vLLM-style flat keywords, validated by the same settings as the
    deployment YAML and `fleetlm serve`'s flags (`EngineArgs.from_kwargs`);
    `speculative_config` is vLLM's dict (e.g. {"method": "ngram", "num_speculative_tokens":
    4} or {"model": DRAFT, "num_speculative_tokens": 4})."""
    return EngineConfig.from_args(EngineArgs.from_kwargs(model, speculative_config, **kwargs))


class LLM:
    """`LLM(model, tensor_parallel_size=3, pipeline_parallel_size=2, ...)`: keyword arguments
    are the fields of the model, engine and parallel sections of the deployment YAML
    (`fleetlm.executor.settings`), with the same defaults and checks. Use as a context
    manager (or call `shutdown`) to stop a worker group's actors when done."""

    def __init__(self, model: str = BUILTIN_MODEL, **engine_args) -> None:
        self.engine = LLMEngine(make_engine_config(model, **engine_args))
        self._counter = itertools.count()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one value or one per prompt")
        request_ids = []
        for prompt, p in zip(prompts, params_list):
            request_ids.append(str(next(self._counter)))
            self.engine.add_request(request_ids[-1], prompt, p)
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: Conversation,
                            add_generation_prompt: bool = True) -> list[int]:
        return list(self.engine.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=False))

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[r] for r in request_ids]
