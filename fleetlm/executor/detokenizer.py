"""Incremental detokenization of one completion, with stop strings.

Text is streamed as deltas that are never taken back: a delta never ends inside a UTF-8
character that later tokens complete, and never contains any part of a stop string (unless
`include_stop_str_in_output`). Fast Hugging Face tokenizers decode through the tokenizers
library's `DecodeStream`; other tokenizers through a short re-decoded window.
"""

from __future__ import annotations

from typing import Any

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
# Prompt tokens decoded before the output, so the first output token's leading space (or
# its absence) is decided in context, as in the full text.
_NUM_PROMPT_CONTEXT_TOKENS = 8
_INVALID_PREFIX_ERROR = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Turns one completion's output tokens into text deltas and finds its stop strings.

    `update(new_token_ids) -> (delta, stop_string)`: `delta` is the text that became safe to
    show. Held back are an incomplete trailing UTF-8 character and, unless
    `include_stop_str_in_output`, the longest tail that could still begin a stop string.
    When a stop string appears, the text is cut before it (after it with
    `include_stop_str_in_output`), the rest is dropped, and the stop string is returned;
    `update` must not be called again. Among several matches the one that ends first wins
    (ties: the one that starts first), so the result does not depend on how the text was
    split into tokens.

    `flush()` is called when the request finishes for another reason: it returns the
    held-back text (an incomplete trailing character as the decoder renders it).
    `output_text` is everything returned so far, i.e. the completion's cumulative text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_text = ""
        self.stop_string: str | None = None
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._text = ""  # all decoded text; output_text is a prefix of it
        self._decoder = _make_decoder(tokenizer, prompt_token_ids, skip_special_tokens)

    def update(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        assert self.stop_string is None, "update() after a stop string finished the text"
        num_searched = len(self._text)
        self._text += "".join(self._decoder.step(t) for t in new_token_ids)
        match = self._find_stop(num_searched)
        if match is None:
            return self._emit(len(self._text) - self._num_held_back()), None
        self.stop_string, cut = match
        self._text = self._text[:cut]
        return self._emit(cut), self.stop_string

    def flush(self) -> str:
        """Emit everything held back; call once, when the request finishes without a stop."""
        if self.stop_string is None:
            self._text += self._decoder.flush()
        return self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        delta = self._text[len(self.output_text):end]
        self.output_text += delta
        return delta

    def _find_stop(self, num_searched: int) -> tuple[str, int] | None:
        """(stop string, where to cut) for the first match ending in the new text."""
        if not self.stop:
            return None
        start = max(0, num_searched - self._max_stop_len + 1)
        best = None  # (end, begin, stop)
        for stop in self.stop:
            begin = self._text.find(stop, start)
            if begin != -1 and (best is None or (begin + len(stop), begin) < best[:2]):
                best = (begin + len(stop), begin, stop)
        if best is None:
            return None
        end, begin, stop = best
        return stop, end if self.include_stop_str_in_output else begin

    def _num_held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if self.include_stop_str_in_output:
            return 0  # a match always ends in new text, so what was emitted stays
        for length in range(min(self._max_stop_len - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(stop.startswith(tail) for stop in self.stop):
                return length
        return 0


def _make_decoder(tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer  # a bare tokenizers.Tokenizer
    if backend is not None and DecodeStream is not None:
        return _StreamDecoder(backend, prompt_token_ids, skip_special_tokens)
    return _WindowDecoder(tokenizer, prompt_token_ids, skip_special_tokens)


def _prompt_context(decode, prompt_token_ids: list[int]) -> list[int]:
    """The prompt's last few tokens, starting on a whole character."""
    context = list(prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:])
    while context and _REPLACEMENT_CHAR in decode(context):
        context = context[1:]
    return context


class _StreamDecoder:
    """Fast tokenizers: `DecodeStream` yields text only once a character is complete."""

    def __init__(self, backend: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids stepped since the stream last yielded text
        for token_id in _prompt_context(self._decode, prompt_token_ids):
            self._step(token_id)

    def step(self, token_id: int) -> str:
        chunk = self._step(token_id)
        if chunk is None:
            self._pending.append(token_id)
            return ""
        self._pending.clear()
        return chunk

    def flush(self) -> str:
        text = self._decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:
            # Some decoders are not prefix-stable (the new text does not extend the old);
            # DecodeStream then refuses. Start a fresh stream from this token, as vLLM does.
            if _INVALID_PREFIX_ERROR not in str(error):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)


class _WindowDecoder:
    """Any tokenizer with `decode`: re-decode the ids since the last emitted token's
    predecessor and emit what grew, unless it ends in an incomplete character."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = _prompt_context(self._decode, prompt_token_ids)
        self._num_read = len(self._ids)  # ids[:num_read] are emitted; ids[0] is context

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Keep one emitted token as context for the next one's leading space.
        del self._ids[: max(0, self._num_read - 1)]
        self._num_read = len(self._ids)
        return text

    def flush(self) -> str:
        text = self._new_text()
        self._num_read = len(self._ids)
        return text

    def _new_text(self) -> str:
        emitted = self._decode(self._ids[: self._num_read])
        return self._decode(self._ids)[len(emitted):]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
