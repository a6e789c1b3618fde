"""deploy/Dockerfile: its shape (fast, everywhere) and its cpu target carried out (slow, opt-in).

The full run, `test_cpu_target_builds_and_serves`, carries out the cpu target's own steps
without Docker (deploy/docker/build_without_docker.py: overlay mounts and chroot, so root),
then runs the result like a container: `fleetlm serve` answers /health and a chat completion.
It takes several minutes on 2 CPU cores, so it is a release check (`scripts/test -m release`,
deploy/README.md "Container"), not part of CI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
TARGETS = ("cpu", "cuda")
MODEL_CACHE = "/home/fleetlm/.cache/fleetlm"  # deploy/kuberay/rayservice.yaml mounts it
IMAGE_UID = "1000"  # rayservice.yaml's runAsUser


def _load_reader():
    """deploy/docker/dockerfile_reader.py, which is no package's module."""
    spec = importlib.util.spec_from_file_location("dockerfile_reader",
                                                  DOCKER_DIR / "dockerfile_reader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dockerfile_reader = _load_reader()


@pytest.fixture(scope="module")
def spec() -> dockerfile_reader.Dockerfile:
    return dockerfile_reader.load(DOCKERFILE)


def _last(stage: dockerfile_reader.Stage, keyword: str) -> dockerfile_reader.Instruction:
    found = [i for i in stage.instructions if i.keyword == keyword]
    assert found, f"stage {stage.name} has no {keyword}"
    return found[-1]


def test_both_targets_are_multi_stage(spec):
    for target in TARGETS:
        stages = spec.stages_for(target)
        assert len(stages) >= 2, f"{target} is built in one stage"
        copied = {i.flags["from"] for i in spec.stage(target).instructions
                  if i.keyword == "COPY" and "from" in i.flags}
        assert copied == {stages[0].name}, f"{target} copies from {copied}"
        builder_bases = {stage.base for stage in stages}
        assert len(builder_bases) == 1, "the runtime stage starts from the builder's base"


def test_targets_run_fleetlm_serve_as_the_non_root_user_with_the_cache_volume(spec):
    for target in TARGETS:
        stage = spec.stage(target)
        assert _last(stage, "USER").value.split(":")[0] == IMAGE_UID
        assert _last(stage, "ENTRYPOINT").exec_form == ["fleetlm", "serve"]
        config = _last(stage, "CMD").exec_form
        assert config and (REPO / config[0]).is_file()
        assert _last(stage, "VOLUME").exec_form == [MODEL_CACHE]
        assert "8000" in _last(stage, "EXPOSE").value.split()
        assert "/health" in _last(stage, "HEALTHCHECK").value


def test_the_image_makes_the_user_and_its_cache_folder(spec):
    for target in TARGETS:
        runs = " ".join(i.value for i in spec.stage(target).instructions if i.keyword == "RUN")
        assert f"--uid {IMAGE_UID}" in runs and " fleetlm" in runs
        assert f"-o fleetlm -g fleetlm {MODEL_CACHE}" in runs  # the volume starts writable


def test_builders_install_with_the_setup_script(spec):
    flavours = {"cpu": "FLEETLM_TORCH=cpu", "cuda": "FLEETLM_TORCH=cuda"}
    for target, flavour in flavours.items():
        builder = spec.stages_for(target)[0]
        runs = [i.value for i in builder.instructions if i.keyword == "RUN"]
        assert any("scripts/setup.sh" in run and flavour in run
                   and "FLEETLM_INSTALL=package" in run for run in runs)


def test_image_configs_listen_on_every_interface_but_the_checkout_keeps_loopback(spec):
    for target in TARGETS:
        builder = spec.stages_for(target)[0]
        assert any("host: 0.0.0.0" in i.value for i in builder.instructions
                   if i.keyword == "RUN")
    # The image's build rewrites that line in every shipped config and fails without it.
    for config in sorted((REPO / "configs").glob("*.yaml")):
        assert "\n  host: 127.0.0.1" in config.read_text(), config.name


def test_every_copy_source_is_in_the_build_context(spec):
    ignore = dockerfile_reader.read_dockerignore(REPO / ".dockerignore")
    for stage in spec.stages:
        for copy in (i for i in stage.instructions if i.keyword == "COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.value.split()[:-1]:
                assert (REPO / source).exists(), f"line {copy.lineno}: {source}"
                assert not dockerfile_reader.is_ignored(source, ignore), \
                    f"line {copy.lineno}: {source} is in .dockerignore"


def test_dockerignore_keeps_local_state_out():
    ignore = dockerfile_reader.read_dockerignore(REPO / ".dockerignore")
    for path in (".venv/bin/python", ".git/HEAD", "benchmarks/results/run.json",
                 "fleetlm/__pycache__/cli.cpython-311.pyc", "fleetlm.egg-info/PKG-INFO"):
        assert dockerfile_reader.is_ignored(path, ignore), path
    for path in ("fleetlm/cli.py", "fleetlm/kernels/csrc/paged_attention.c", "configs"):
        assert not dockerfile_reader.is_ignored(path, ignore), path


def test_reader_joins_continuations_and_reads_flags():
    text = ("ARG BASE=img:1\nFROM ${BASE} AS one\n# note\nRUN a \\\n  # inside\n    && b\n"
            "FROM ${BASE} AS two\nCOPY --from=one --chown=1:1 /x /y\n")
    spec = dockerfile_reader.parse(text)
    assert spec.global_args == {"BASE": "img:1"}
    [run] = spec.stage("one").instructions
    assert run.keyword == "RUN" and run.value.split() == ["a", "&&", "b"]
    copy = spec.stage("two").instructions[0]
    assert copy.flags == {"from": "one", "chown": "1:1"} and copy.value == "/x /y"
    assert [s.name for s in spec.stages_for("two")] == ["one", "two"]
    assert dockerfile_reader.substitute("${A}/b:$P ${N:-d}${A:+!}", {"A": "a", "P": "p"}) \
        == "a/b:p d!"


@pytest.mark.slow
@pytest.mark.release
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for overlay mounts and chroot")
@pytest.mark.timeout(2400)
def test_cpu_target_builds_and_serves():
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "build_without_docker.py"), "--target", "cpu",
         # Take torch from the package index pip is set up with (the CPU build here).
         "--build-arg", "TORCH_INDEX_URL="],
        cwd=REPO, capture_output=True, text=True, check=False)
    print(result.stdout[-8000:], result.stderr[-8000:])
    print(f"build and run: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0
    for step in ("fleetlm --help", "import fleetlm, torch", "chat completion",
                 "stopped by SIGTERM"):
        assert f"ok: {step}" in result.stdout
