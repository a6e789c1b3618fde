"""`fleetlm`: serve, deploy, status, shutdown, config show, quantize (and `bench`, when installed).

A thin argparse dispatcher; the work happens in fleetlm.cluster.launcher, and the settings'
flags come from the deployment schema (fleetlm.cluster.flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fleetlm.cluster import flags

RAY_AUTH_MODE_VAR = "RAY_AUTH_MODE"
RAY_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a single-node Ray on loopback
RAY_SAVED_TOKEN = Path.home() / ".ray" / "auth_token"  # where a local `ray.init` saves it
# How long serve/deploy wait for every replica to run (model loading included) before giving up.
DEFAULT_DEPLOY_TIMEOUT_S = 900.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    address = {"help": "Ray cluster to join (default: $RAY_ADDRESS)", "default": None}

    serve = commands.add_parser(
        "serve", help="start (or join) a cluster, deploy, run until ^C",
        description="Serve a model (or a deployment YAML) until ^C; flags override the file.")
    serve.add_argument("--address", **address)
    _add_deploy_limits(serve)
    flags.add_config_arguments(serve)

    deploy = commands.add_parser(
        "deploy", help="deploy onto a running cluster and return",
        description="Deploy a model (or a deployment YAML) onto a running cluster.")
    deploy.add_argument("--address", **address)
    _add_deploy_limits(deploy)
    flags.add_config_arguments(deploy, is_required=True)

    config = commands.add_parser("config", help="show the effective deployment config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="print the YAML that serve would deploy with these arguments",
        description="Print the effective deployment YAML: defaults < file < flags.")
    flags.add_config_arguments(show)

    status = commands.add_parser("status", help="applications, deployments and replicas")
    status.add_argument("--address", **address)

    shutdown = commands.add_parser("shutdown", help="delete an application, or all of Serve")
    shutdown.add_argument("--address", **address)
    shutdown.add_argument("--app", default=None, help="application name (default: all)")

    quantize = commands.add_parser(
        "quantize", help="write a quantized checkpoint (W8A8 INT8 or FP8, compressed-tensors)",
        description="Quantize a model into a compressed-tensors checkpoint (the format LLM "
        "Compressor writes; fleetlm, vLLM and transformers load it): W8A8 rounds every Linear "
        "weight but the LM head to int8 with a scale per output row, FP8_DYNAMIC to float8 "
        "e4m3 (for GPUs); activations are quantized per token at run time.")
    quantize.add_argument("model", help="built-in model name, Hugging Face folder or .gguf file")
    quantize.add_argument("out", type=Path, help="folder to write (created if missing)")
    quantize.add_argument("--scheme", default="W8A8", choices=["W8A8", "FP8_DYNAMIC"],
                          help="quantization scheme (default: %(default)s)")
    quantize.add_argument(
        "--smoothquant", type=float, default=None, metavar="STRENGTH",
        help="run SmoothQuant first with this strength in [0, 1] (LLM Compressor's W8A8 "
        "examples use 0.8), calibrated on built-in prompts: moves activation outliers into "
        "the weights (default: off)")

    commands.add_parser("bench", help="benchmark a running server (fleetlm bench serve -h)",
                        add_help=False)  # fmt: skip
    return parser


def _add_deploy_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_DEPLOY_TIMEOUT_S, metavar="SECONDS",
        help="give up when not every replica runs by then (default: %(default)g); the "
        "application stays deployed")
    parser.add_argument(
        "--wait-for-resources", action="store_true",
        help="when the cluster's nodes cannot hold the config yet, wait (within --timeout) for "
        "more nodes to join instead of failing at once")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _use_saved_ray_token()
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as e:  # OSError covers ConnectionError
        print(f"fleetlm {args.command}: {e}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # A local cluster: Ray reads this once, when it is imported (which importing the
        # launcher does), and then binds every service to 127.0.0.1 instead of the host's
        # network address.
        os.environ.setdefault(RAY_CLUSTER_VAR, "0")
    from fleetlm.cluster import launcher

    config = _load(args)
    is_cluster_owned = launcher.connect(args.address, is_local_allowed=True, config=config)
    # After connecting: ray.init installs a crash handler on SIGTERM that aborts the process
    # 3 s later (mid-teardown, leaving Ray's agents behind); ours replaces it. `kill` then
    # stops serve as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launcher.deploy_and_wait(config, args.timeout, args.wait_for_resources)
        print(launcher.ready_message(config), flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("Shutting down ...", flush=True)
        launcher.teardown(config.name, is_cluster_owned)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from fleetlm.cluster import launcher

    config = _load(args)
    launcher.connect(args.address, is_local_allowed=False)
    launcher.deploy_and_wait(config, args.timeout, args.wait_for_resources)
    print(launcher.ready_message(config))
    return 0


def _status(args: argparse.Namespace) -> int:
    from fleetlm.cluster import launcher

    launcher.connect(args.address, is_local_allowed=False)
    print("\n".join(launcher.status_lines()))
    return 0


def _shutdown(args: argparse.Namespace) -> int:
    from fleetlm.cluster import launcher

    launcher.connect(args.address, is_local_allowed=False)
    launcher.teardown(args.app, is_cluster_owned=False)
    print(f"Deleted {args.app}." if args.app else "Serve is shut down.")
    return 0


def _config(args: argparse.Namespace) -> int:
    print(flags.to_yaml(_load(args)), end="")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from fleetlm.executor.weights.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, scheme=args.scheme,
                              smoothquant=args.smoothquant)
    print(f"wrote {args.scheme} checkpoint to {out}; serve it with `fleetlm serve {out}`")
    return 0


_COMMANDS = {"serve": _serve, "deploy": _deploy, "status": _status, "shutdown": _shutdown,
             "config": _config, "quantize": _quantize}


def _load(args: argparse.Namespace):
    """The effective config, checked against the model where it can be read here (fail
    before Ray)."""
    from fleetlm.cluster.config import check_model_fits

    config = flags.effective_config(args.model_or_config, flags.overrides(args))
    try:
        check_model_fits(config)
    except ValueError as e:
        raise ValueError(f"{args.model_or_config or 'the defaults'}: {e}") from None
    return config


def _use_saved_ray_token() -> None:
    """Join token-protected clusters (Ray's default) with the saved token.

    `ray.init(address=...)` sends the token only in token mode, which must be chosen before
    Ray is imported. Set RAY_AUTH_MODE yourself to override (`disabled`: no tokens).
    """
    if RAY_AUTH_MODE_VAR not in os.environ and RAY_SAVED_TOKEN.is_file():
        os.environ[RAY_AUTH_MODE_VAR] = "token"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _bench(argv: list[str]) -> int:
    from fleetlm.bench import run  # says what to install when the bench extra is missing

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
