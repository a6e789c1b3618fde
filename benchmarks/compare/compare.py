"""Side-by-side serving benchmark: fleetlm, vLLM's CPU build and llama.cpp's server.

    benchmarks/compare/run.sh                 # the issue's run: 3 repeats, random 256/128 at C=1,8,32
                                         # and shared-prefix, all three systems (1.5-2 h here)
    benchmarks/compare/run.sh --quick         # smoke test: 4 prompts, 16 tokens out, C=1,2, 1 repeat
    benchmarks/compare/run.sh --table-only    # rebuild compare.md / compare.json from raw results

Each system is installed into the work dir on first use (skipped later), then for each repeat,
in an order rotated per repeat, started alone, warmed up, benchmarked with
`python -m fleetlm.bench serve` at every workload point and stopped. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.compare.plan import QUICK, WORKLOADS, PlanConfig, Point, points, system_order
from benchmarks.compare.plots import write_plot
from benchmarks.compare.report import render
from benchmarks.compare.session import SessionRecord, SessionRunner, result_path, save_record
from benchmarks.compare.summary import build_summary
from benchmarks.compare.system_fleetlm import FleetlmGgufSystem, FleetlmSystem
from benchmarks.compare.system_llamacpp import LlamaCppSystem
from benchmarks.compare.system_vllm import DTYPES, VllmSystem
from benchmarks.compare.systems import Context, System
from benchmarks.compare.targets import evaluate_all

SYSTEMS: dict[str, Callable[[Context], System]] = {
    "fleetlm": FleetlmSystem, "vllm": VllmSystem, "llamacpp": LlamaCppSystem,
    "fleetlm-gguf": FleetlmGgufSystem}
DEFAULT_SYSTEMS = ("fleetlm", "vllm", "llamacpp")
MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "fleetlm" / "compare"
DEFAULT_OUT_DIR = Path("benchmarks/results/compare")
END_OF_GENERATION_TOKENS = ("<|endoftext|>", "<|im_end|>")
INSTALL_TIMES_FILE = "install-times.json"
MIN_RECORDED_INSTALL_S = 5.0  # shorter means the install was skipped: keep the earlier time


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def _name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in choices]
        if not names or unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"want distinct names from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/compare/run.sh", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--systems", type=_name_list(tuple(SYSTEMS)), default=DEFAULT_SYSTEMS,
        help="comma list, in the order of the first repeat (default: fleetlm,vllm,llamacpp; "
             "fleetlm-gguf serves the GGUF's blocks quantized)")
    add("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    add("--concurrency", type=_int_list, default=None, help="random workload (default 1,8,32)")
    add("--num-prompts", type=int, default=None, help="per point (default 64)")
    add("--input-len", type=int, default=None, help="random: prompt tokens (default 256)")
    add("--output-len", type=int, default=None, help="tokens out per request (default 128)")
    add("--workloads", type=_name_list(WORKLOADS), default=None,
        help="comma list (default random,shared-prefix)")
    add("--shared-prefix-concurrency", type=_int_list, default=None, help="default 8")
    add("--seed", type=int, default=0, help="base seed of the prompts")
    add("--out", type=Path, default=DEFAULT_OUT_DIR, help="results folder")
    add("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="installs and builds")
    add("--host", default=DEFAULT_HOST)
    add("--threads", type=int, default=os.cpu_count() or 1, help="threads/cores per server")
    add("--vllm-dtype", choices=DTYPES, default=DTYPES[0],
        help="vLLM's dtype to try first (the other one if it does not start)")
    add("--quick", action="store_true",
        help="tiny smoke run: 4 prompts, 16 tokens out, C=1,2, shared prefix 128, 1 repeat")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--install-only", action="store_true", help="install, then stop")
    mode.add_argument("--table-only", action="store_true", help="only rebuild the table")
    return parser


def plan_config(args: argparse.Namespace) -> PlanConfig:
    """The plan: the issue's sizes (or --quick's), with any size given on the command line."""
    base = QUICK if args.quick else PlanConfig()
    overrides = {"concurrencies": args.concurrency, "num_prompts": args.num_prompts,
                 "input_len": args.input_len, "output_len": args.output_len,
                 "workloads": args.workloads,
                 "shared_prefix_concurrencies": args.shared_prefix_concurrency}
    fields = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    return PlanConfig(**fields)


def num_repeats(args: argparse.Namespace) -> int:
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    return repeats


def end_of_generation_ids(hf_dir: Path) -> tuple[int, ...]:
    """Ids of the tokens that end generation (the EOS of config.json, <|endoftext|>,
    <|im_end|>), read from the model folder's tokenizer.json and config.json."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tokenizer.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", ())})
    ids = {vocab[name] for name in END_OF_GENERATION_TOKENS if name in vocab}
    eos = json.loads((hf_dir / "config.json").read_text()).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))


def make_context(args: argparse.Namespace, plan: PlanConfig) -> Context:
    from fleetlm.executor.weights import builtin_gguf_path, resolve_model

    hf_dir = resolve_model(MODEL_NAME)
    return Context(
        repo_root=Path(__file__).resolve().parents[2], work_dir=args.work_dir.expanduser(),
        out_dir=args.out.resolve(), host=args.host, model_name=MODEL_NAME, hf_dir=hf_dir,
        gguf_path=builtin_gguf_path(MODEL_NAME), python=sys._base_executable,
        num_threads=args.threads, max_concurrency=plan.max_concurrency,
        eos_token_ids=end_of_generation_ids(hf_dir))


def install_all(systems: Sequence[System], work_dir: Path) -> dict[str, dict]:
    """Install each system (skipping what is done); {name: {"install_s", "install_error"}}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    times_path = work_dir / INSTALL_TIMES_FILE
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    status = {}
    for system in systems:
        print(f"compare: installing {system.name} (log {system.install_log})", flush=True)
        start, error = time.monotonic(), None
        try:
            system.install()
        except (RuntimeError, OSError) as exc:
            error = f"install failed: {exc}"
            print(f"compare: {system.name}: {error}", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - start
        if error is None and elapsed >= MIN_RECORDED_INSTALL_S:
            times[system.name] = elapsed
        status[system.name] = {"install_s": times.get(system.name), "install_error": error}
    times_path.write_text(json.dumps(times, indent=1) + "\n")
    return status


def pending_sessions(system: System, plan_points: Sequence[tuple[int, Point]], out_dir: Path,
                     repeat: int) -> dict[str, list[tuple[int, Point]]]:
    """The points of `repeat` without results yet, grouped by server start (session key)."""
    sessions: dict[str, list[tuple[int, Point]]] = {}
    for index, point in plan_points:
        if not result_path(out_dir, system.name, repeat, point).is_file():
            sessions.setdefault(system.session_key(point.workload), []).append((index, point))
    return sessions


def _report(record: SessionRecord) -> None:
    if record.error or record.failed_points or record.failed_variants:
        print(f"compare: {record.system}: error={record.error} failed={record.failed_points} "
              f"failed variants={[v.splitlines()[0] for v in record.failed_variants]}",
              file=sys.stderr, flush=True)
    if record.is_port_freed is False:
        raise RuntimeError(f"{record.system}'s port is still bound after stopping it")


def run_repeats(systems: Sequence[System], plan: PlanConfig, repeats: int, ctx: Context,
                base_seed: int) -> None:
    """Every repeat, systems in rotated order, one server session at a time. A system that
    does not come up is not retried in later repeats."""
    runners = {s.name: SessionRunner(s, plan, ctx.out_dir, base_seed) for s in systems}
    by_name = {s.name: s for s in systems}
    plan_points = list(enumerate(points(plan)))
    broken: set[str] = set()
    for repeat in range(repeats):
        for name in system_order(list(by_name), repeat):
            sessions = pending_sessions(by_name[name], plan_points, ctx.out_dir, repeat)
            for key, session_points in sessions.items():
                if name in broken:
                    break
                print(f"compare: repeat {repeat + 1}/{repeats}: {name} [{key}] "
                      f"{', '.join(p.key for _, p in session_points)}", flush=True)
                record = runners[name].run(repeat, key, session_points)
                save_record(ctx.out_dir, record)
                _report(record)
                if record.variant is None:
                    broken.add(name)


def collect_runs(out_dir: Path, names: Sequence[str], plan: PlanConfig) -> list[tuple]:
    """(system, point key, repeat, client result entry) for every finished run on disk."""
    runs = []
    for point in points(plan):
        for name in names:
            for folder in sorted((out_dir / "raw" / name).glob("repeat-*")):
                path = folder / point.key / "results.json"
                if path.is_file():
                    entry = json.loads(path.read_text())["results"][0]
                    runs.append((name, point.key, int(folder.name.partition("-")[2]), entry))
    return runs


def system_infos(systems: Sequence[System], out_dir: Path, status: dict) -> list[dict]:
    infos = []
    for system in systems:
        files = sorted((out_dir / "raw" / system.name).glob("repeat-*/session-*.json"))
        sessions = [json.loads(f.read_text()) for f in files]
        settings = list(dict.fromkeys(line for s in sessions for line in s.get("settings", ())))
        infos.append({"name": system.name, "versions": system.versions(), "settings": settings,
                      **status.get(system.name, {}), "sessions": sessions})
    return infos


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "unknown")
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 ** 2
    return {"cpu": model, "num_cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1)}


def write_outputs(systems: Sequence[System], plan: PlanConfig, ctx: Context, repeats: int,
                  base_seed: int, status: dict) -> str:
    summary = build_summary(collect_runs(ctx.out_dir, [s.name for s in systems], plan))
    infos = system_infos(systems, ctx.out_dir, status)
    run_info = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **machine_info(), "model": ctx.model_name, "repeats": repeats,
                "seed": base_seed, "plan": plan.__dict__}
    document = {"run": run_info, "systems": infos, "summary": summary,
                "targets": evaluate_all(summary)}
    (ctx.out_dir / "compare.json").write_text(json.dumps(document, indent=1) + "\n")
    markdown = render(summary, infos, {k: v for k, v in run_info.items() if k != "plan"}
                      | {"points": ", ".join(summary["points"]) or "none"})
    (ctx.out_dir / "compare.md").write_text(markdown)
    if summary["points"]:
        write_plot(summary, ctx.out_dir)
    return markdown


def _status(out_dir: Path, fresh: dict | None) -> dict:
    """Install status of this run merged into the one saved by earlier runs."""
    path = out_dir / "install.json"
    status = json.loads(path.read_text()) if path.is_file() else {}
    status.update(fresh or {})
    path.write_text(json.dumps(status, indent=1) + "\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan, repeats = plan_config(args), num_repeats(args)
    except ValueError as exc:
        parser.error(str(exc))
    ctx = make_context(args, plan)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    systems = [VllmSystem(ctx, args.vllm_dtype) if name == "vllm" else SYSTEMS[name](ctx)
               for name in args.systems]
    fresh = None if args.table_only else install_all(systems, ctx.work_dir)
    status = _status(ctx.out_dir, fresh)
    if args.install_only:
        return 0 if all(s["install_error"] is None for s in fresh.values()) else 1
    if not args.table_only:
        usable = [s for s in systems if fresh[s.name]["install_error"] is None]
        run_repeats(usable, plan, repeats, ctx, args.seed)
    print(write_outputs(systems, plan, ctx, repeats, args.seed, status))
    print(f"compare: wrote {ctx.out_dir / 'compare.md'} and compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
