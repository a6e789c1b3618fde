"""Fixtures of the bench tests: one fake OpenAI server per session, small tokenizers."""

from __future__ import annotations

import pytest
from bench_fake_server import FakeOpenAIServer, make_bpe_tokenizer, make_word_tokenizer

from fleetlm.bench.tokenizer import RawTokenizer


@pytest.fixture(scope="session")
def fake_server():
    server = FakeOpenAIServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def word_tokenizer() -> RawTokenizer:
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> RawTokenizer:
    return make_bpe_tokenizer()
