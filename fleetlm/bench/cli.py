"""`fleetlm bench serve`: benchmark any OpenAI-compatible server (also `python -m fleetlm.bench`).

Example (the issue's reference run)::

    fleetlm bench serve --base-url http://127.0.0.1:8000 --model NAME \\
        --workload random --input-len 256 --output-len 128 --num-prompts 64 \\
        --max-concurrency 1,8,32 --endpoint completions --result-dir DIR --seed 0

Options (see `--help` for defaults):

Server   --base-url, --model (default: the first of GET /v1/models), --endpoint completions|chat,
         --api-key, --request-timeout (s), --temperature (default 0: greedy),
         --extra-body JSON (merged into every request body).
Workload --workload random|shared-prefix|multi-turn, --num-prompts (requests in all),
         --input-len (tokens per user message), --output-len (max_tokens), --prefix-len and
         --num-groups (shared-prefix), --num-turns (multi-turn), --seed.
         Every request sends `ignore_eos: true` (vLLM/fleetlm extension) unless --no-ignore-eos;
         --ban-eos also bans the EOS ids through `logit_bias` for servers that ignore it (ids
         from --eos-token-ids or the tokenizer).
Tokenizer --tokenizer DIR|FILE.gguf|built-in name: builds prompts from real token ids (each
         re-encodes to its length +- 1) and checks the server's `usage` against the tokenizer's
         count of the returned text. Without it prompts come from a word list (lengths in words,
         approximate) and `usage` is taken on trust.
Load     --max-concurrency N[,N...] caps requests in flight; --request-rate R[,R...] sends
         conversations as a seeded Poisson process (default inf: all at once). A comma list of
         either one is a sweep, run one point after another on the same workload;
         --num-warmups N requests are sent once before the sweep and not measured.
Metrics  --goodput ttft:MS tpot:MS e2el:MS counts requests within every given SLO.
         ITL is per token: a chunk carrying k tokens adds k samples of (gap / k); see
         fleetlm/bench/metrics.py for every definition. --continuous-usage asks for usage in
         every chunk (vLLM's continuous_usage_stats) to learn k; otherwise each text chunk
         counts as one token (vLLM bench's assumption).
Output   --result-dir DIR gets results.json (every metric and per-request values), results.md
         (the table, also printed) and latency_throughput.png, ttft_distribution.png,
         itl_distribution.png. --disable-tqdm hides the progress bar.

Exit status: 0 when every load point completed at least one request, 1 otherwise, 2 on bad
options.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fleetlm.bench.client import ENDPOINT_PATHS, EndpointConfig, fetch_model_name
from fleetlm.bench.metrics import (
    BenchMetrics,
    attach_tokenizer_counts,
    compute_metrics,
    parse_slos,
)
from fleetlm.bench.plots import write_plots
from fleetlm.bench.prompts import make_prompt_source
from fleetlm.bench.report import markdown_table, write_json, write_markdown
from fleetlm.bench.runner import LoadPoint, run_sweep
from fleetlm.bench.tokenizer import BenchTokenizer, load_tokenizer
from fleetlm.bench.workloads import WORKLOAD_NAMES, WorkloadConfig, build_workload

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_RESULT_DIR = "bench/results"
_DEFAULTS = WorkloadConfig()


def _comma_list(convert: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None

    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--model", default=None, help="default: first model of /v1/models")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINT_PATHS), default="completions")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--extra-body", type=_json_object, default={},
                        help="JSON object merged into every request body")
    parser.add_argument("--continuous-usage", action="store_true",
                        help="ask for usage in every chunk (exact tokens per chunk)")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="a new connection per request (servers that drop reused ones)")


def _add_workload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, default=_DEFAULTS.name)
    parser.add_argument("--num-prompts", type=int, default=_DEFAULTS.num_prompts,
                        help="requests in all (multi-turn: conversations x turns)")
    parser.add_argument("--input-len", type=int, default=_DEFAULTS.input_len,
                        help="tokens per user message")
    parser.add_argument("--output-len", type=int, default=_DEFAULTS.output_len,
                        help="max_tokens per request")
    parser.add_argument("--prefix-len", type=int, default=_DEFAULTS.prefix_len,
                        help="shared-prefix: system prompt tokens")
    parser.add_argument("--num-groups", type=int, default=_DEFAULTS.num_groups,
                        help="shared-prefix: distinct system prompts")
    parser.add_argument("--num-turns", type=int, default=_DEFAULTS.num_turns,
                        help="multi-turn: turns per conversation")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    parser.add_argument("--ban-eos", action="store_true", help="also ban EOS ids by logit_bias")
    parser.add_argument("--eos-token-ids", type=_comma_list(int), default=None)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--tokenizer", default=None,
                        help="HF directory, .gguf file or the built-in model name")


def _add_load_and_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-concurrency", type=_comma_list(int), default=None,
                        help="cap on requests in flight; N or N,N,... (a sweep)")
    parser.add_argument("--request-rate", type=_comma_list(float), default=[math.inf],
                        help="Poisson arrivals per second; R or R,R,... (default inf)")
    parser.add_argument("--num-warmups", type=int, default=0)
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                        help="SLOs, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    parser.add_argument("--result-dir", type=Path, default=Path(DEFAULT_RESULT_DIR))
    parser.add_argument("--disable-tqdm", action="store_true")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm bench", description="Serving benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="benchmark an OpenAI-compatible server",
        description=__doc__, formatter_class=_HelpFormatter,
    )
    _add_server_options(serve)
    _add_workload_options(serve)
    _add_load_and_output_options(serve)
    return parser


def load_points(max_concurrency: list[int] | None, request_rates: list[float]) -> list[LoadPoint]:
    """The sweep: one list may have several values, the other at most one."""
    concurrencies = max_concurrency or [None]
    if not concurrencies or not request_rates:
        raise ValueError("--max-concurrency and --request-rate need at least one value")
    if len(concurrencies) > 1 and len(request_rates) > 1:
        raise ValueError("sweep either --max-concurrency or --request-rate, not both")
    return [LoadPoint(c, r) for c in concurrencies for r in request_rates]


def _banned_ids(args: argparse.Namespace, tokenizer: BenchTokenizer | None) -> tuple[int, ...]:
    if not args.ban_eos:
        return ()
    if args.eos_token_ids:
        return tuple(args.eos_token_ids)
    if tokenizer is None or not tokenizer.eos_token_ids:
        raise ValueError("--ban-eos needs --eos-token-ids or a --tokenizer that knows its EOS")
    return tokenizer.eos_token_ids


def _endpoint_config(args: argparse.Namespace, tokenizer: BenchTokenizer | None):
    config = EndpointConfig(
        base_url=args.base_url, model=args.model or "", endpoint=args.endpoint,
        api_key=args.api_key, temperature=args.temperature,
        banned_token_ids=_banned_ids(args, tokenizer),
        is_continuous_usage=args.continuous_usage, extra_body=args.extra_body,
        request_timeout_s=args.request_timeout, is_new_connection_per_request=args.no_keepalive,
    )
    if not args.model:
        config = dataclasses.replace(config, model=asyncio.run(fetch_model_name(config)))
    return config


def _workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, prefix_len=args.prefix_len, num_groups=args.num_groups,
        num_turns=args.num_turns, is_ignore_eos=not args.no_ignore_eos, seed=args.seed,
    )


def _run_info(config: EndpointConfig, workload, tokenizer, argv: Sequence[str]) -> dict:
    workload_fields = dataclasses.asdict(workload.config)
    return {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base_url": config.base_url, "model": config.model, "endpoint": config.endpoint,
        "workload": workload_fields.pop("name"), **workload_fields,
        "tokenizer": tokenizer.name if tokenizer else None,
        "prompt_source": workload.prompt_source, "argv": list(argv),
    }


def _warn_about_tokens(metrics: Sequence[BenchMetrics]) -> None:
    """Say on stderr when token counts cannot be trusted or outputs stopped early."""
    for m in metrics:
        a = m.accounting
        if a.num_mismatches:
            print(f"warning: {m.label}: {a.num_mismatches}/{a.num_checked} requests report "
                  f"usage.completion_tokens != tokenizer count (max diff {a.max_abs_mismatch})",
                  file=sys.stderr)
        if a.num_usage_missing:
            print(f"warning: {m.label}: {a.num_usage_missing} streams had no usage; counts "
                  "come from the tokenizer or the chunks", file=sys.stderr)
        if a.num_short_outputs:
            print(f"warning: {m.label}: {a.num_short_outputs} outputs ended before max_tokens "
                  "(server ignores ignore_eos? try --ban-eos)", file=sys.stderr)


def run_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Build the workload, run the sweep, write results.json, results.md and the plots."""
    slos = parse_slos(args.goodput)
    loads = load_points(args.max_concurrency, args.request_rate)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    source = make_prompt_source(tokenizer)
    if not source.is_exact:
        print(f"note: prompts from a {source.description}", file=sys.stderr)
    workload = build_workload(_workload_config(args), source)
    config = _endpoint_config(args, tokenizer)
    results = asyncio.run(run_sweep(config, workload, loads, args.seed, args.num_warmups,
                                    is_progress_shown=not args.disable_tqdm))
    for result in results:
        if tokenizer is not None:
            attach_tokenizer_counts(result.records, tokenizer)
    metrics = [compute_metrics(result, slos) for result in results]
    run_info = _run_info(config, workload, tokenizer, argv)
    args.result_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.result_dir / "results.json", run_info, results, metrics)
    write_markdown(args.result_dir / "results.md", run_info, metrics)
    write_plots(args.result_dir, results, metrics)
    print(markdown_table(metrics))
    _warn_about_tokens(metrics)
    return 0 if all(m.num_completed > 0 for m in metrics) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fleetlm bench ...`; `argv` excludes the program name
    (e.g. `["serve", ...]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_serve(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    return 2  # unreachable: parser.error exits
