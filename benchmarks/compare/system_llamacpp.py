"""llama.cpp's own C++ `llama-server`, built with CMake, serving the built-in Q4_1 GGUF.

Source: the llama.cpp tree vendored in PyPI's `llama-cpp-python` sdist (downloaded with pip, so
no other host is needed). Build: static, Release, only the `llama-server` target, with the
instruction sets of this CPU named explicitly (no `-march=native`, no AMX: the native build
crashed in ggml's AMX path on the reference machine).
Start: parallel slots with continuous batching and a KV cache per slot (the best setting
measured on the reference machine), both cores for generation and prompt processing.
llama-server honours `ignore_eos`; the client also bans the end-of-generation ids by logit_bias.
"""

from __future__ import annotations

import os
import sys
import tarfile
from collections.abc import Collection
from pathlib import Path

from benchmarks.compare.install import (
    command_output,
    run_logged,
    stamp_matches,
    write_stamp,
)
from benchmarks.compare.systems import Launch, System

LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
COMMON_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
    "-DGGML_F16C=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
)
AVX512_FEATURES = {"avx512f": "-DGGML_AVX512", "avx512_vnni": "-DGGML_AVX512_VNNI",
                   "avx512_bf16": "-DGGML_AVX512_BF16"}
MIN_SLOTS = 32
CTX_PER_SLOT = 2048  # tokens: room for shared-prefix (1024 + 64 in, 128 out) in every slot
BATCH_TOKENS, UBATCH_TOKENS = 2048, 512  # llama.cpp's logical / physical batch sizes
INSTALL_STEPS_VERSION = 1
START_TIMEOUT_S = 120.0


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The `flags` of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cmake_flags(flags: Collection[str]) -> tuple[str, ...]:
    """CMake options for a CPU with these flags: AVX2 always, each AVX-512 part if present."""
    isa = tuple(f"{option}={'ON' if feature in flags else 'OFF'}"
                for feature, option in AVX512_FEATURES.items())
    bmi2 = ("-DGGML_BMI2=ON",) if "bmi2" in flags else ()
    return COMMON_CMAKE_FLAGS + bmi2 + isa


class LlamaCppSystem(System):
    name = "llamacpp"
    start_timeout_s = START_TIMEOUT_S

    @property
    def folder(self) -> Path:
        return self.ctx.work_dir / "llamacpp"

    @property
    def binary(self) -> Path:
        return self.folder / "build" / "bin" / "llama-server"

    @property
    def client_extra_args(self) -> tuple[str, ...]:  # type: ignore[override]
        ids = ",".join(map(str, self.ctx.eos_token_ids))
        ban = ("--ban-eos", "--eos-token-ids", ids) if ids else ()
        return (*ban, "--no-keepalive")  # llama-server drops reused keep-alive connections

    def _cmake_flags(self) -> tuple[str, ...]:
        return cmake_flags(cpu_flags(Path("/proc/cpuinfo").read_text()))

    def install(self) -> None:
        want = f"{LLAMA_CPP_REQUIREMENT} {' '.join(self._cmake_flags())} " \
               f"steps={INSTALL_STEPS_VERSION}"
        if stamp_matches(self.folder, want) and self.binary.is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        source = self._fetch_source()
        build = self.folder / "build"
        log = self.install_log
        run_logged(["cmake", "-S", str(source), "-B", str(build), *self._cmake_flags()], log)
        run_logged(["cmake", "--build", str(build), "--target", "llama-server",
                    "-j", str(self.ctx.num_threads)], log)
        run_logged([str(self.binary), "--version"], log)
        write_stamp(self.folder, want)

    def _fetch_source(self) -> Path:
        """Download and unpack the sdist; the vendored llama.cpp folder."""
        sdist_dir = self.folder / "sdist"
        run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "--dest", str(sdist_dir), LLAMA_CPP_REQUIREMENT], self.install_log)
        version = LLAMA_CPP_REQUIREMENT.partition("==")[2]
        archives = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz")
        archive = archives[0]
        source_root = self.folder / "src"
        with tarfile.open(archive) as tar:
            tar.extractall(source_root, filter="data")
        return source_root / archive.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"

    def versions(self) -> dict[str, str]:
        text = command_output([str(self.binary), "--version"])
        build = next((line.partition(":")[2].strip() for line in text.splitlines()
                      if line.startswith("version")), "unknown")
        return {"llama-cpp-python sdist": LLAMA_CPP_REQUIREMENT.partition("==")[2],
                "llama.cpp": build}

    def launch_variants(self, port: int, workload: str) -> list[Launch]:
        num_slots = max(MIN_SLOTS, self.ctx.max_concurrency)
        threads = str(self.ctx.num_threads)
        options = ("-t", threads, "-tb", threads, "-np", str(num_slots), "--cont-batching",
                   "--no-kv-unified", "-c", str(num_slots * CTX_PER_SLOT),
                   "-b", str(BATCH_TOKENS), "-ub", str(UBATCH_TOKENS))
        argv = (str(self.binary), "-m", str(self.ctx.gguf_path), "--host", self.ctx.host,
                "--port", str(port), "--alias", self.ctx.model_name, *options)
        isa = " ".join(self._cmake_flags()[-4:])
        settings = (f"llama-server from {LLAMA_CPP_REQUIREMENT} sdist, {isa}", " ".join(options),
                    f"client: {' '.join(self.client_extra_args)}")
        return [Launch(argv, dict(os.environ), "q4_1", settings=settings)]
