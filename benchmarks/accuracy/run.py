"""Accuracy of each way fleetlm can run the built-in model, with lm-eval against the server.

    pip install -e '.[eval]'          # lm-eval[api]; not part of the default setup
    .venv/bin/python benchmarks/accuracy/run.py --out docs/results/accuracy.json

The reference is lm-eval's own `hf` backend (transformers) on the same float32 weights (the
built-in GGUF file converted to a Hugging Face folder). Each variant is a real `fleetlm serve`
on 127.0.0.1 that lm-eval's `local-completions` backend queries (token ids in, `echo` and
`logprobs` back, as lm-eval does against any OpenAI-compatible server):

- float:   float32 weights (the file dequantized on load), float32 KV cache;
- gguf:    `--quantization gguf`: the file's Q4_1 / Q8_0 blocks multiplied as they are, by
           integer dot products on int8 activations (in an AVX2 build every Q4_1 product;
           the Q8_0 LM head from 64 rows, and everything elsewhere, by the dequantized
           weights' GEMM);
- gguf_int8_dot: the same with `--max-num-batched-tokens 48`, so that every product, prompt
           tokens included, goes through the integer dot products of a decode step;
- w8a8:    a `fleetlm quantize --scheme W8A8` checkpoint (int8 weights, int8 activations);
- w8a8_smoothquant: the same after SmoothQuant (`--smoothquant 0.5`);
- int8_kv: float32 weights, `--kv-cache-dtype int8`;
- gguf_int8_kv: `--quantization gguf --kv-cache-dtype int8` (`configs/bench-cpu-gguf.yaml`);
- bf16:    `--dtype bfloat16`, weights and KV cache (what `fleetlm serve` runs by default on a
           CPU with AVX512-BF16 or AMX), through the bf16 GEMM or oneDNN the CPU gets.

The task is `fleetlm_mc` (benchmarks/accuracy/fleetlm_mc.yaml: 214 four-way questions, read
from the repository). For each variant: accuracy, and how far its per-answer loglikelihoods
are from the reference's (mean and largest absolute difference, in nats), and how many
questions it answers differently. Nothing is downloaded (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fleetlm.bench.machine import cpu_name
from fleetlm.executor.weights import resolve_model

ROOT = Path(__file__).resolve().parents[2]
TASK = "fleetlm_mc"
MODEL = "smollm2-135m-instruct"
PORT = 8011
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes",
              "256MiB", "--port", str(PORT), "--name", "accuracy",
              "--served-model-name", MODEL]
VARIANTS = {  # name -> the flags `fleetlm serve` gets
    "float": [],
    "gguf": ["--quantization", "gguf"],
    "gguf_int8_dot": ["--quantization", "gguf", "--max-num-batched-tokens", "48"],
    "w8a8": [],
    "w8a8_smoothquant": [],
    "int8_kv": ["--kv-cache-dtype", "int8"],
    "gguf_int8_kv": ["--quantization", "gguf", "--kv-cache-dtype", "int8"],
    "bf16": ["--dtype", "bfloat16"],  # after SERVE_ARGS' float32: the last --dtype counts
}
# Variants served from their own folder, written by `fleetlm quantize` with these flags.
QUANTIZED = {"w8a8": ["--scheme", "W8A8"],
             "w8a8_smoothquant": ["--scheme", "W8A8", "--smoothquant", "0.5"]}
STARTUP_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60


def lm_eval(model: str, model_args: str, out: Path) -> Path:
    """Run lm-eval's CLI on the task; returns the folder its results went to."""
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(ROOT / "benchmarks" / "accuracy"),
               "--log_samples", "--output_path", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, env=dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    return out


def read_run(out: Path) -> dict:
    """(accuracy figures, {doc id: [loglikelihood per choice]}) from an lm-eval output folder."""
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    [samples] = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    metrics = json.loads(Path(results).read_text())["results"][TASK]
    loglikelihoods, picks = {}, {}
    for line in Path(samples).read_text().splitlines():
        sample = json.loads(line)
        values = [float(resp[0][0]) for resp in sample["resps"]]
        loglikelihoods[sample["doc_id"]] = values
        picks[sample["doc_id"]] = values.index(max(values))
    return {"acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"],
            "acc_norm": metrics["acc_norm,none"], "loglikelihoods": loglikelihoods,
            "picks": picks}


def compare(run: dict, reference: dict) -> dict:
    diffs = [abs(a - b) for doc, values in reference["loglikelihoods"].items()
             for a, b in zip(values, run["loglikelihoods"][doc])]
    return {"acc": run["acc"], "acc_stderr": run["acc_stderr"], "acc_norm": run["acc_norm"],
            "acc_points_vs_reference": 100 * (run["acc"] - reference["acc"]),
            "mean_abs_loglikelihood_diff": sum(diffs) / len(diffs),
            "max_abs_loglikelihood_diff": max(diffs),
            "answers_changed": sum(run["picks"][doc] != pick
                                   for doc, pick in reference["picks"].items())}


def serve(model: str, extra: list[str]) -> subprocess.Popen:
    """`fleetlm serve` in the background, returned once /health answers."""
    server = subprocess.Popen([sys.executable, "-m", "fleetlm.cli", "serve", model,
                               *SERVE_ARGS, *extra], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"fleetlm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5):
                return server
        except OSError:
            time.sleep(2)
    stop(server)
    raise TimeoutError("fleetlm serve did not become healthy")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)  # `fleetlm serve` stops as on Ctrl-C
    try:
        server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def run_variant(name: str, tokenizer: Path, work: Path) -> dict:
    model = MODEL
    if name in QUANTIZED:
        model = str(work / name)
        subprocess.run([sys.executable, "-m", "fleetlm.cli", "quantize", MODEL, model,
                        *QUANTIZED[name]], cwd=ROOT, check=True)
    server = serve(model, VARIANTS[name])
    try:
        model_args = (f"model={MODEL},base_url=http://127.0.0.1:{PORT}/v1/completions,"
                      f"num_concurrent=8,max_retries=2,tokenized_requests=True,"
                      f"tokenizer_backend=huggingface,tokenizer={tokenizer}")
        return read_run(lm_eval("local-completions", model_args, work / name))
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_dir = resolve_model(MODEL)
    results: dict = {"machine": cpu_name(), "task": TASK, "model": MODEL, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="fleetlm-accuracy-") as tmp:
        work = Path(tmp)
        reference = read_run(lm_eval("hf", f"pretrained={model_dir},dtype=float32",
                                     work / "hf"))
        results["reference_hf"] = {"acc": reference["acc"], "acc_stderr": reference["acc_stderr"],
                                   "acc_norm": reference["acc_norm"]}
        for name in args.variants.split(","):
            run = run_variant(name, model_dir, work)
            results["variants"][name] = compare(run, reference)
            print(json.dumps({name: results["variants"][name]}), flush=True)
    print("| variant | acc | Δ acc (points) | answers changed | mean / max |Δ loglikelihood| (nats) |")
    print("|---|---|---|---|---|")
    print(f"| transformers (`hf`), reference | {reference['acc']:.4f} ± "
          f"{reference['acc_stderr']:.4f} | — | — | — |")
    for name, row in results["variants"].items():
        print(f"| {name} | {row['acc']:.4f} | {row['acc_points_vs_reference']:+.1f} | "
              f"{row['answers_changed']} | {row['mean_abs_loglikelihood_diff']:.2e} / "
              f"{row['max_abs_loglikelihood_diff']:.2e} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
