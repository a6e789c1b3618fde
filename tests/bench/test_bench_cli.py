"""`fleetlm bench serve` end to end against the fake server: results JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from bench_fake_server import FAKE_MODEL, FakeBehaviour

from fleetlm.bench.cli import load_points, main
from fleetlm.bench.plots import PLOT_FILES
from fleetlm.bench.runner import LoadPoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_PROMPTS, OUTPUT_LEN = 6, 4


@pytest.fixture(scope="module")
def sweep_dir(fake_server, tmp_path_factory):
    """One CLI sweep over two concurrencies; the model name comes from /v1/models."""
    fake_server.configure(FakeBehaviour(ttft_s=0.005, itl_s=0.002))
    result_dir = tmp_path_factory.mktemp("bench")
    argv = ["serve", "--base-url", fake_server.base_url, "--workload", "random",
            "--num-prompts", str(NUM_PROMPTS), "--input-len", "8",
            "--output-len", str(OUTPUT_LEN), "--max-concurrency", "1,3", "--endpoint", "chat",
            "--goodput", "ttft:1000", "tpot:1000", "--result-dir", str(result_dir),
            "--disable-tqdm", "--seed", "5"]
    assert main(argv) == 0
    assert {s.body["model"] for s in fake_server.served} == {FAKE_MODEL}
    return result_dir


def test_json_has_every_metric_per_load_point(sweep_dir):
    document = json.loads((sweep_dir / "results.json").read_text())
    assert document["run"]["model"] == FAKE_MODEL
    assert document["run"]["seed"] == 5 and document["run"]["workload"] == "random"
    assert "word list" in document["run"]["prompt_source"]
    assert [p["max_concurrency"] for p in document["results"]] == [1, 3]
    for point in document["results"]:
        assert point["num_completed"] == NUM_PROMPTS
        assert point["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert point["goodput"] == pytest.approx(point["request_throughput"])  # all within SLOs
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(point[name]) == {"mean", "median", "p90", "p99"}
        for key in ("output_throughput", "total_token_throughput", "duration_s", "accounting"):
            assert key in point
        assert len(point["requests"]) == NUM_PROMPTS
        assert len(point["requests"][0]["itl_ms"]) == OUTPUT_LEN - 1
    assert document["results"][0]["max_in_flight"] == 1


def test_markdown_table_has_a_row_per_load_point(sweep_dir):
    text = (sweep_dir / "results.md").read_text()
    assert "| concurrency 1 | 6/6 |" in text and "| concurrency 3 | 6/6 |" in text
    assert "TTFT ms mean / med / p99" in text and "usage != tokenizer" in text


def test_plots_are_non_empty_pngs(sweep_dir):
    for name in PLOT_FILES:
        data = (sweep_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_short_outputs_are_warned_about(fake_server, tmp_path, capsys):
    fake_server.configure(FakeBehaviour(ttft_s=0.002, itl_s=0.001, num_output_tokens=2))
    argv = ["serve", "--base-url", fake_server.base_url, "--model", FAKE_MODEL,
            "--num-prompts", "2", "--input-len", "4", "--output-len", "5",
            "--result-dir", str(tmp_path), "--disable-tqdm"]
    assert main(argv) == 0
    assert "2 outputs ended before max_tokens" in capsys.readouterr().err
    assert [s.body["ignore_eos"] for s in fake_server.served] == [True, True]


def test_sweeps_go_over_one_dimension():
    assert load_points([1, 8], [math.inf]) == [LoadPoint(1), LoadPoint(8)]
    assert load_points(None, [1.0, 2.0]) == [LoadPoint(None, 1.0), LoadPoint(None, 2.0)]
    with pytest.raises(ValueError, match="not both"):
        load_points([1, 8], [1.0, 2.0])


@pytest.mark.parametrize("extra, message", [
    (["--max-concurrency", "1,2", "--request-rate", "1,2"], "not both"),
    (["--goodput", "latency:5"], "--goodput"),
    (["--ban-eos"], "--ban-eos needs"),
    (["--max-concurrency", "two"], "comma-separated"),
])
def test_bad_options_exit_with_status_2(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "m", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_shows_the_documented_options():
    completed = subprocess.run([sys.executable, "-m", "fleetlm.bench", "serve", "--help"],
                               capture_output=True, text=True, check=True)
    for option in ("--max-concurrency", "--request-rate", "--goodput", "--tokenizer",
                   "--workload", "--result-dir", "--endpoint"):
        assert option in completed.stdout


@pytest.mark.parametrize("absent", ["aiohttp", "matplotlib"])
def test_without_the_bench_extra_it_names_what_to_install(absent, monkeypatch, capsys):
    from fleetlm import cli

    monkeypatch.setitem(sys.modules, absent, None)  # what Python does for an absent package
    assert cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:9"]) == 1
    error = capsys.readouterr().err
    assert absent in error and "pip install 'fleetlm[bench]'" in error
