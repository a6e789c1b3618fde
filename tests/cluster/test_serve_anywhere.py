"""`fleetlm serve` as an installed command run from an empty directory, with nothing of the
repository around it: without arguments it serves the built-in model on 127.0.0.1:8000 (Serve's
proxy owns the port, Ray listens on loopback) and on SIGTERM exits 0 and stops every Ray
process it started; given a .gguf file and flags it serves that file on the flags' port behind
an API key, and publishes its OpenAPI schema, which schemathesis fuzzes: no answer is a 5xx
and serving goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import processes
import pytest
import requests

from fleetlm.executor.weights.builtin import builtin_gguf_path

pytestmark = pytest.mark.slow  # each server: a Ray cluster and the built-in model, ~40 s

BIN = Path(sys.executable).parent  # the environment's console scripts: fleetlm, schemathesis
BUILTIN = "smollm2-135m-instruct"
READY_LINE = "fleetlm is serving"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
API_KEY = "sk-anywhere"
GGUF_PORT = 8123
FUZZ_TIME_S = 20  # schemathesis's budget: as many generated requests as fit
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}


@contextmanager
def fleetlm_serve(argv: list[str], cwd: Path) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`fleetlm serve ARGV` in `cwd` (its own Ray cluster, started without scripts/setup.sh's
    environment) until it says it serves: (the process, its output so far); on exit,
    SIGTERM, as a user's ^C."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([str(BIN / "fleetlm"), "serve", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    is_done = threading.Event()  # it serves, or it has ended

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if line.startswith(READY_LINE):
                is_done.set()
        is_done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        is_done.wait(START_TIMEOUT_S)
        if proc.poll() is not None or not any(line.startswith(READY_LINE) for line in output):
            pytest.fail("fleetlm serve did not come up:\n" + "".join(output[-30:]))
        yield proc, output
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _chat(base_url: str, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{base_url}/v1/chat/completions", json=HELLO, headers=headers,
                         timeout=60)


def test_serve_without_arguments_is_the_built_in_model_on_port_8000(tmp_path):
    with fleetlm_serve([], cwd=tmp_path) as (proc, output):
        models = requests.get("http://127.0.0.1:8000/v1/models", timeout=30).json()
        assert [card["id"] for card in models["data"]] == [BUILTIN]
        answer = _chat("http://127.0.0.1:8000")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert any("Ray cluster: 127.0.0.1:" in line for line in output), output[-10:]
        started = processes.descendants(proc.pid)
        assert any("raylet" in cmd for cmd in started.values()), started
        assert "ProxyActor" in started.get(processes.listener(8000, started), ""), started
    assert proc.returncode == 0, "".join(output[-40:])
    processes.assert_all_gone(started)


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(base URL, model path): the built-in model's GGUF file served as a file, with flags."""
    folder = tmp_path_factory.mktemp("anywhere")
    # Named as the built-in model, so its converted weights (~20 s of work) are reused.
    gguf = folder / f"{BUILTIN}.gguf"
    gguf.symlink_to(builtin_gguf_path(BUILTIN))
    argv = [str(gguf), "--port", str(GGUF_PORT), "--api-key", API_KEY, "--max-model-len", "64",
            "--kv-cache-memory-bytes", "16MiB"]
    with fleetlm_serve(argv, cwd=folder):
        yield f"http://127.0.0.1:{GGUF_PORT}", str(gguf)


def test_a_gguf_file_is_served_on_the_flags_port_behind_the_key(gguf_server):
    base_url, model = gguf_server
    auth = {"Authorization": f"Bearer {API_KEY}"}
    models = requests.get(f"{base_url}/v1/models", headers=auth, timeout=30).json()
    assert [(card["id"], card["max_model_len"]) for card in models["data"]] == [(model, 64)]
    assert _chat(base_url).status_code == 401
    assert _chat(base_url, auth).status_code == 200


def test_the_openapi_schema_declares_the_request_bodies(gguf_server):
    base_url, _ = gguf_server
    schema = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["security"] == [{"bearer": []}] and "400" in chat["responses"]
    assert requests.get(f"{base_url}/docs", timeout=30).status_code == 200


@pytest.mark.parametrize("token_id", [2**70, -2**70, 49152])
def test_a_token_id_outside_any_vocabulary_is_a_400(gguf_server, token_id):
    """Found by the fuzzing below: ids past 64 bits in a whole block (16 tokens) crashed the
    ingress's prompt hashing."""
    base_url, _ = gguf_server
    answer = requests.post(f"{base_url}/v1/completions", timeout=60,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"prompt": [504] * 15 + [token_id], "max_tokens": 1})
    assert answer.status_code == 400, answer.text
    assert "prompt token ids must be in [0, 49152)" in answer.json()["error"]["message"]


def test_schemathesis_finds_no_server_error_and_serving_goes_on(gguf_server, tmp_path):
    base_url, _ = gguf_server
    run = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{base_url}/openapi.json",
         "--checks", "not_a_server_error", "--phases", "fuzzing",
         "--max-time", str(FUZZ_TIME_S), "--seed", "14", "--workers", "1",
         "--request-timeout", "60", "-H", f"Authorization: Bearer {API_KEY}"],
        check=False, cwd=tmp_path, capture_output=True, text=True,
        timeout=FUZZ_TIME_S + 120)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Test cases:" in run.stdout
    assert requests.get(f"{base_url}/health", timeout=30).status_code == 200
    assert _chat(base_url, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
