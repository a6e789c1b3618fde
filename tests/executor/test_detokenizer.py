"""Incremental detokenizer: multi-byte characters, prompt context, stop strings.

The tokenizers are tiny BPEs trained here, so the tests run offline. Byte-level BPE splits
emoji, CJK and accented characters over several tokens: the case streaming must get right.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fleetlm.executor.detokenizer import IncrementalDetokenizer

EOS = "<|endoftext|>"
CORPUS = [
    "Hello world, this is a test of streaming text.",
    "Café déjà vu — naïve résumé",
    "日本語のテキスト 中文字符",
    "emoji 😀🎉👍 fun 🚀",
] * 5
MIXED_TEXT = "Hi 😀 日本 café 🚀 naïve résumé 中文 👍!"


class SlowTokenizer:
    """Only `decode`: forces the detokenizer's window path."""

    def __init__(self, fast):
        self.fast = fast

    def decode(self, token_ids, skip_special_tokens=False):
        return self.fast.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def byte_level():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


@pytest.fixture(scope="module")
def metaspace():
    """SentencePiece-style: decoding strips the first token's leading space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(["hello world how are you today my friend"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detokenizer, token_ids, chunk=1):
    """Feed ids `chunk` at a time; returns (deltas, stop string or None)."""
    deltas = []
    for i in range(0, len(token_ids), chunk):
        delta, stop = detokenizer.update(token_ids[i:i + chunk])
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    return deltas, None


@pytest.mark.parametrize("slow", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_multibyte_text_streams_without_replacement_chars(byte_level, slow, chunk):
    ids = _encode(byte_level, MIXED_TEXT)
    # The case under test really occurs: some tokens are pieces of a character.
    assert any("\ufffd" in byte_level.decode([t]) for t in ids)
    tokenizer = SlowTokenizer(byte_level) if slow else byte_level
    detokenizer = IncrementalDetokenizer(tokenizer, _encode(byte_level, "Say:"))
    deltas, stop = _stream(detokenizer, ids, chunk)
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == byte_level.decode(ids) == MIXED_TEXT
    assert detokenizer.flush() == ""
    assert detokenizer.output_text == MIXED_TEXT


@pytest.mark.parametrize("slow", [False, True])
def test_prompt_context_gives_the_first_token_its_leading_space(metaspace, slow):
    prompt, output = _encode(metaspace, "hello world"), _encode(metaspace, " how are you")
    expected = metaspace.decode(prompt + output)[len(metaspace.decode(prompt)):]
    assert expected == " how are you" != metaspace.decode(output)
    tokenizer = SlowTokenizer(metaspace) if slow else metaspace
    deltas, _ = _stream(IncrementalDetokenizer(tokenizer, prompt), output)
    assert "".join(deltas) == expected


@pytest.mark.parametrize("slow", [False, True])
def test_flush_emits_an_unfinished_last_character(byte_level, slow):
    ids = _encode(byte_level, "fun 🚀")
    cut = next(i for i in range(len(ids), 0, -1) if "\ufffd" in byte_level.decode(ids[:i]))
    tokenizer = SlowTokenizer(byte_level) if slow else byte_level
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = _stream(detokenizer, ids[:cut])
    assert "".join(deltas).startswith("fun") and "\ufffd" not in "".join(deltas)
    assert "\ufffd" in detokenizer.flush()
    assert detokenizer.output_text == byte_level.decode(ids[:cut])


def test_special_tokens_skipped_or_kept(byte_level):
    ids = _encode(byte_level, "Hello world") + [byte_level.eos_token_id]
    skipped = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(byte_level, [], skip_special_tokens=False)
    assert "".join(_stream(skipped, ids)[0]) == "Hello world"
    assert "".join(_stream(kept, ids)[0]) == "Hello world" + EOS


def _check_stop(tokenizer, text, stop, expected_text, expected_stop, include=False):
    ids = _encode(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stop,
                                         include_stop_str_in_output=include)
    deltas, matched = _stream(detokenizer, ids)
    assert matched == expected_stop
    assert detokenizer.output_text == "".join(deltas) == expected_text
    if not include:  # no delta prefix ever showed a stop string
        shown = ""
        for delta in deltas:
            shown += delta
            assert not any(s in shown for s in stop)
    return ids, deltas


def test_stop_string_split_over_tokens_is_never_emitted(byte_level):
    ids, deltas = _check_stop(byte_level, "Hello world, this is a test", ["world, th"],
                              "Hello ", "world, th")
    # The stop string really spans several tokens.
    assert not any("world, th" in byte_level.decode([t]) for t in ids)
    assert len(deltas) < len(ids)  # finished at the token that completed the match


def test_stop_string_kept_with_include_stop_str_in_output(byte_level):
    _check_stop(byte_level, "Hello world, this is a test", ["is a"],
                "Hello world, this is a", "is a", include=True)


def test_stop_string_in_multibyte_text(byte_level):
    _check_stop(byte_level, "emoji 😀🎉👍 fun", ["🎉👍"], "emoji 😀", "🎉👍")


@pytest.mark.parametrize("stop", [["world", "lo w"], ["lo w", "world"]])
def test_earliest_ending_stop_string_wins(byte_level, stop):
    _check_stop(byte_level, "Hello world, this is a test", stop, "Hel", "lo w")


def test_held_back_text_is_released_when_it_cannot_begin_a_stop(byte_level):
    ids = _encode(byte_level, "this is a test")
    detokenizer = IncrementalDetokenizer(byte_level, [], stop=["is a tent"])
    shown = [detokenizer.update([t])[0] for t in ids]
    assert "".join(shown) == "this is a test"  # "is a te" held, then "s" rules it out
    assert detokenizer.flush() == ""


def test_only_a_possible_stop_prefix_is_held_back(byte_level):
    detokenizer = IncrementalDetokenizer(byte_level, [], stop=["xyz", "fun!"])
    deltas, _ = _stream(detokenizer, _encode(byte_level, "Hello world, fun"))
    assert "".join(deltas) == "Hello world, "  # only "fun" could begin a stop string
    assert detokenizer.flush() == "fun"
    assert detokenizer.output_text == "Hello world, fun"
