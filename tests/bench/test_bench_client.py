"""The client's request bodies, stream parsing and token accounting against the fake server."""

from __future__ import annotations

import socket

import pytest
from bench_fake_server import FAKE_MODEL, FAKE_REPLICA, TOKEN_TEXT, FakeBehaviour, run_against

from fleetlm.bench.client import EndpointConfig, build_payload
from fleetlm.bench.metrics import attach_tokenizer_counts, compute_metrics, request_timings
from fleetlm.bench.prompts import WordPromptSource
from fleetlm.bench.report import request_row
from fleetlm.bench.runner import LoadPoint
from fleetlm.bench.workloads import Turn, WorkloadConfig, build_workload

NUM_PROMPTS, OUTPUT_LEN = 4, 8
FAST = FakeBehaviour(ttft_s=0.005, itl_s=0.002)


def _workload(num_prompts=NUM_PROMPTS, output_len=OUTPUT_LEN):
    config = WorkloadConfig(num_prompts=num_prompts, input_len=5, output_len=output_len)
    return build_workload(config, WordPromptSource())


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
TURN = Turn("hello", num_tokens=1, max_tokens=7, is_ignore_eos=True)


def test_completion_payload_flattens_messages_and_asks_for_usage():
    config = EndpointConfig("http://h:1", "m", endpoint="completions")
    assert build_payload(config, MESSAGES, TURN) == {
        "model": "m", "prompt": "be brief\nhello", "max_tokens": 7, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }


def test_chat_payload_bans_eos_and_merges_extra_body():
    config = EndpointConfig("http://h:1", "m", endpoint="chat", banned_token_ids=(2, 5),
                            is_continuous_usage=True, extra_body={"temperature": 0.5, "top_k": 3})
    payload = build_payload(config, MESSAGES, TURN)
    assert payload["messages"] == MESSAGES and "prompt" not in payload
    assert payload["logit_bias"] == {"2": -100, "5": -100}
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert payload["temperature"] == 0.5 and payload["top_k"] == 3


def test_without_ignore_eos_nothing_is_banned():
    config = EndpointConfig("http://h:1", "m", banned_token_ids=(2,))
    payload = build_payload(config, MESSAGES, Turn("hello", 1, 7, is_ignore_eos=False))
    assert "ignore_eos" not in payload and "logit_bias" not in payload


def test_bad_endpoint_options_are_rejected():
    with pytest.raises(ValueError, match="endpoint"):
        EndpointConfig("http://h:1", "m", endpoint="embeddings")
    with pytest.raises(ValueError, match="base_url"):
        EndpointConfig("127.0.0.1:8000", "m")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_text_and_usage_are_recorded(fake_server, endpoint):
    fake_server.configure(FAST)
    result = run_against(fake_server, _workload(), LoadPoint(), endpoint=endpoint)
    for record in result.records:
        assert record.text == TOKEN_TEXT * OUTPUT_LEN
        assert record.usage_completion_tokens == OUTPUT_LEN
        assert record.usage_prompt_tokens == 5
        assert record.chunk_num_tokens == [1] * OUTPUT_LEN
        assert record.replica == FAKE_REPLICA and request_row(record)["replica"] == FAKE_REPLICA
    assert [s.body["model"] for s in fake_server.served] == [FAKE_MODEL] * NUM_PROMPTS


def test_continuous_usage_gives_tokens_per_chunk(fake_server):
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.004, tokens_per_chunk=3))
    result = run_against(fake_server, _workload(output_len=9), LoadPoint(), is_continuous_usage=True)
    for record in result.records:
        assert record.chunk_num_tokens == [3, 3, 3]
        timings = request_timings(record)
        first_gap = record.chunk_times[1] - record.chunk_times[0]
        assert len(timings.itls_s) == 6  # tokens after the first chunk, each gap / 3
        assert timings.itls_s[:3] == pytest.approx([first_gap / 3] * 3)
        assert sum(timings.itls_s) == pytest.approx(record.chunk_times[-1] - record.chunk_times[0])
        assert timings.num_output_tokens == 9


def test_without_continuous_usage_each_chunk_is_one_token(fake_server):
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.004, tokens_per_chunk=3))
    result = run_against(fake_server, _workload(output_len=9), LoadPoint())
    for record in result.records:
        assert record.chunk_num_tokens == [1, 1, 1]
        timings = request_timings(record)
        assert len(timings.itls_s) == 2
        assert timings.num_output_tokens == 9  # usage still counts every token
        assert timings.tpot_s == pytest.approx((timings.e2el_s - timings.ttft_s) / 8)


def test_usage_is_checked_against_the_tokenizer(fake_server, word_tokenizer):
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.002, usage_completion_offset=2))
    result = run_against(fake_server, _workload(), LoadPoint())
    attach_tokenizer_counts(result.records, word_tokenizer)
    metrics = compute_metrics(result)
    assert [r.num_tokenizer_tokens for r in result.records] == [OUTPUT_LEN] * NUM_PROMPTS
    assert metrics.accounting.num_checked == NUM_PROMPTS
    assert metrics.accounting.num_mismatches == NUM_PROMPTS
    assert metrics.accounting.max_abs_mismatch == 2
    assert metrics.total_output_tokens == NUM_PROMPTS * (OUTPUT_LEN + 2)  # usage is reported


def test_missing_usage_falls_back_to_tokenizer_then_chunks(fake_server, word_tokenizer):
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.002, is_usage_sent=False,
                                        tokens_per_chunk=2))
    result = run_against(fake_server, _workload(), LoadPoint())
    by_chunks = compute_metrics(result)
    assert by_chunks.accounting.num_usage_missing == NUM_PROMPTS
    assert by_chunks.total_output_tokens == NUM_PROMPTS * OUTPUT_LEN // 2  # 2 tokens a chunk
    assert by_chunks.total_input_tokens == NUM_PROMPTS * 5  # the workload's own count
    attach_tokenizer_counts(result.records, word_tokenizer)
    by_tokenizer = compute_metrics(result)
    assert by_tokenizer.total_output_tokens == NUM_PROMPTS * OUTPUT_LEN
    assert by_tokenizer.accounting.num_checked == 0


def test_outputs_shorter_than_max_tokens_are_counted(fake_server):
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.002, num_output_tokens=5))
    metrics = compute_metrics(run_against(fake_server, _workload(), LoadPoint()))
    assert metrics.accounting.num_short_outputs == NUM_PROMPTS
    assert metrics.total_output_tokens == NUM_PROMPTS * 5


def test_http_errors_are_recorded_not_raised(fake_server):
    fake_server.configure(FAST)
    result = run_against(fake_server, _workload(num_prompts=2), LoadPoint(),
                         base_url=fake_server.base_url + "/nowhere")
    assert all(r.error.startswith("HTTP 404") for r in result.records)
    metrics = compute_metrics(result)
    assert metrics.num_failed == 2 and metrics.num_completed == 0
    assert metrics.ttft_ms.median is None
    assert metrics.error_samples[0].startswith("HTTP 404")


def test_connection_errors_are_recorded_not_raised(fake_server):
    with socket.socket() as sock:  # a port that nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = run_against(fake_server, _workload(num_prompts=2), LoadPoint(),
                         base_url=f"http://127.0.0.1:{closed_port}")
    assert all(r.error.startswith("ClientConnectorError") for r in result.records)


def test_final_usage_chunk_without_text_adds_no_tokens():
    """llama-server sends usage only in its last, text-less chunk: each text chunk is one
    token and that chunk adds none (it once counted as all of them, skewing ITL)."""
    from fleetlm.bench.client import RequestRecord, _on_chunk

    record, parts = RequestRecord("c", 0, max_tokens=3, num_expected_prompt_tokens=4), []
    for i, text in enumerate(["a", "b", "c"]):
        _on_chunk({"choices": [{"text": text}]}, float(i), record, parts, "completions")
    _on_chunk({"choices": [{"text": "", "finish_reason": "length"}],
               "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 3.0, record, parts,
              "completions")
    assert record.chunk_num_tokens == [1, 1, 1] and record.chunk_times == [0.0, 1.0, 2.0]
    assert record.usage_completion_tokens == 3


def test_usage_first_seen_on_the_last_text_chunk_counts_only_that_chunk():
    """A server that sends usage only with its last text chunk: that chunk carries the
    tokens not yet counted, not all of them."""
    from fleetlm.bench.client import RequestRecord, _on_chunk

    record, parts = RequestRecord("c", 0, max_tokens=4, num_expected_prompt_tokens=4), []
    for i, text in enumerate(["a", "b", "c"]):
        _on_chunk({"choices": [{"text": text}]}, float(i), record, parts, "completions")
    _on_chunk({"choices": [{"text": "d", "finish_reason": "length"}],
               "usage": {"prompt_tokens": 4, "completion_tokens": 4}}, 3.0, record, parts,
              "completions")
    assert record.chunk_num_tokens == [1, 1, 1, 1] and "".join(parts) == "abcd"


@pytest.mark.parametrize("is_new_connection", [False, True])
def test_connections_are_reused_unless_asked_not_to(fake_server, is_new_connection):
    """Sequential requests share one keep-alive connection by default, and each gets its own
    with `--no-keepalive` (llama-server drops reused ones)."""
    fake_server.configure(FAST)
    run_against(fake_server, _workload(), LoadPoint(max_concurrency=1),
                is_new_connection_per_request=is_new_connection)
    peers = [s.peer for s in fake_server.served]
    assert len(peers) == NUM_PROMPTS and None not in peers
    assert len(set(peers)) == (NUM_PROMPTS if is_new_connection else 1)
