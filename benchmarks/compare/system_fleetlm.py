"""fleetlm through the README's serve path: `scripts/serve configs/bench-cpu.yaml`, and the same
with the GGUF file's blocks kept quantized over an int8 KV cache (`configs/bench-cpu-gguf.yaml`,
system `fleetlm-gguf`).

The config is used as it is except for the HTTP port: a copy with a free port is written to the
comparison's output folder (the checked-in config serves on 8000, which may be taken).
fleetlm streams several tokens per message (stream coalescing), so the client asks for usage in
every chunk (`--continuous-usage`) to know how many tokens each chunk carried.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from benchmarks.compare.install import command_output
from benchmarks.compare.systems import Launch, System

CONFIG = "configs/bench-cpu.yaml"
SERVE_SCRIPT = "scripts/serve"
START_TIMEOUT_S = 600.0
_CLUSTER_ADDRESS_VAR = "RAY_ADDRESS"  # unset: fleetlm starts (and stops) a Ray cluster of its own


def config_with_port(text: str, host: str, port: int) -> str:
    """The deployment YAML `text` with its HTTP host and port replaced."""
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise TypeError("the fleetlm config is not a YAML mapping")
    config.setdefault("http", {})
    config["http"]["host"], config["http"]["port"] = host, port
    return yaml.safe_dump(config, sort_keys=False)


class FleetlmSystem(System):
    name = "fleetlm"
    config = CONFIG
    start_timeout_s = START_TIMEOUT_S
    client_extra_args = ("--continuous-usage",)

    def install(self) -> None:
        """Nothing to install: scripts/serve sets the project's .venv up on first use."""
        for path in (SERVE_SCRIPT, self.config):
            if not (self.ctx.repo_root / path).is_file():
                raise RuntimeError(f"{self.ctx.repo_root / path} is missing")

    def versions(self) -> dict[str, str]:
        root = str(self.ctx.repo_root)
        commit = command_output(["git", "-C", root, "rev-parse", "--short", "HEAD"]) or "unknown"
        dirty = command_output(["git", "-C", root, "status", "--porcelain", "--", "fleetlm"])
        python = self.ctx.repo_root / ".venv" / "bin" / "python"
        torch = command_output([str(python), "-c", "import torch; print(torch.__version__)"])
        return {"fleetlm": commit + (" (modified)" if dirty else ""),
                "torch": torch.splitlines()[-1] if torch else "unknown"}

    def launch_variants(self, port: int, workload: str) -> list[Launch]:
        source = self.ctx.repo_root / self.config
        config = self.ctx.out_dir / f"fleetlm-{Path(self.config).stem}-port{port}.yaml"
        config.write_text(config_with_port(source.read_text(), self.ctx.host, port))
        env = {k: v for k, v in os.environ.items() if k != _CLUSTER_ADDRESS_VAR}
        argv = (str(self.ctx.repo_root / SERVE_SCRIPT), str(config))
        settings = (f"{SERVE_SCRIPT} {self.config} (port changed to a free one)",
                    f"client: {' '.join(self.client_extra_args)}")
        return [Launch(argv, env, Path(self.config).stem, cwd=self.ctx.repo_root,
                       settings=settings)]


class FleetlmGgufSystem(FleetlmSystem):
    """fleetlm serving the built-in GGUF's Q4_1 blocks as they are (`quantization: gguf`), over
    an int8 KV cache (`kv_cache_dtype: int8`)."""

    name = "fleetlm-gguf"
    config = "configs/bench-cpu-gguf.yaml"
