"""Benchmark workloads: seeded, reproducible lists of conversations.

Every workload is a tuple of `Conversation`s; a single-turn request is a conversation of one turn.
Turns of one conversation are sent one after another (the next turn carries the previous reply),
conversations run side by side under the arrival pattern.

- `random`: `num_prompts` independent prompts of `input_len` tokens, `output_len` tokens out.
- `shared-prefix`: `num_groups` long system prompts (`prefix_len` tokens); the `num_prompts`
  users are spread round-robin over the groups, each asking its own question (`input_len`
  tokens); the order is shuffled, as tenants' requests interleave. Shows prefix caching and
  prefix-aware routing.
- `multi-turn`: `num_prompts // num_turns` conversations of `num_turns` turns; each turn adds a
  new user message of `input_len` tokens after the previous reply, so prompts grow turn by turn.

Every request asks for `output_len` tokens with `ignore_eos` (unless switched off), so output
lengths are fixed when the server honours it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetlm.bench.prompts import PromptSource

WORKLOAD_NAMES = ("random", "shared-prefix", "multi-turn")


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = "random"
    num_prompts: int = 64  # requests in all (multi-turn: conversations x turns)
    input_len: int = 256  # tokens per user message
    output_len: int = 128  # max_tokens of every request
    prefix_len: int = 1024  # shared-prefix: tokens of each group's system prompt
    num_groups: int = 4  # shared-prefix: number of distinct system prompts
    num_turns: int = 4  # multi-turn: turns per conversation
    is_ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOAD_NAMES:
            raise ValueError(f"workload must be one of {WORKLOAD_NAMES}, got {self.name!r}")
        for field_name in ("num_prompts", "input_len", "output_len", "prefix_len", "num_groups",
                           "num_turns"):
            if getattr(self, field_name) < 1:
                raise ValueError(
                    f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.name == "multi-turn" and self.num_prompts % self.num_turns:
            raise ValueError(
                f"multi-turn: num_prompts ({self.num_prompts}) must be a multiple of "
                f"num_turns ({self.num_turns})"
            )


@dataclass(frozen=True)
class Turn:
    """One user message and what to ask for it; `num_tokens` as the prompt source counted."""

    text: str
    num_tokens: int
    max_tokens: int
    is_ignore_eos: bool


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    turns: tuple[Turn, ...]
    system_prompt: str | None = None
    num_system_tokens: int = 0


@dataclass(frozen=True)
class Workload:
    config: WorkloadConfig
    conversations: tuple[Conversation, ...]
    prompt_source: str  # how the prompt text was made (tokenizer or word-list fallback)

    @property
    def num_requests(self) -> int:
        return sum(len(conv.turns) for conv in self.conversations)


def build_workload(config: WorkloadConfig, source: PromptSource) -> Workload:
    """The workload `config.name`; equal configs and sources give equal workloads."""
    rng = np.random.default_rng(config.seed)
    builders = {
        "random": _random,
        "shared-prefix": _shared_prefix,
        "multi-turn": _multi_turn,
    }
    conversations = builders[config.name](config, source, rng)
    return Workload(config, tuple(conversations), source.description)


def _turn(config: WorkloadConfig, source: PromptSource, rng: np.random.Generator) -> Turn:
    text, num_tokens = source.make_text(rng, config.input_len)
    return Turn(text, num_tokens, config.output_len, config.is_ignore_eos)


def _random(config, source, rng) -> list[Conversation]:
    return [
        Conversation(f"random-{i}", (_turn(config, source, rng),))
        for i in range(config.num_prompts)
    ]


def _shared_prefix(config, source, rng) -> list[Conversation]:
    system_prompts = [source.make_text(rng, config.prefix_len) for _ in range(config.num_groups)]
    conversations = []
    for user in range(config.num_prompts):
        group = user % config.num_groups
        system_text, num_system_tokens = system_prompts[group]
        turn = _turn(config, source, rng)
        conv = Conversation(f"group{group}-user{user}", (turn,), system_text, num_system_tokens)
        conversations.append(conv)
    order = rng.permutation(len(conversations))
    return [conversations[i] for i in order]


def _multi_turn(config, source, rng) -> list[Conversation]:
    num_conversations = config.num_prompts // config.num_turns
    return [
        Conversation(
            f"conv-{i}", tuple(_turn(config, source, rng) for _ in range(config.num_turns))
        )
        for i in range(num_conversations)
    ]
