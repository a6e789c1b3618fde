"""Carry out one target of deploy/Dockerfile without Docker, then run the result like a container.

For machines with no Docker engine, or none that reaches the base images' registry. The steps
are the Dockerfile's own, read from it (dockerfile_reader.py): nothing here repeats what it installs.

How it stands in for Docker:
- FROM an image: this machine's root filesystem, read-only, stands in for the base image. It
  must be of the same kind: Debian 12 with Python 3.11 as `python3` (python:3.11-slim-bookworm
  is); other bases (the CUDA image's Ubuntu) are refused. A base layer takes away this
  machine's own users (uid 1000 and up: a fresh image has none) and gives the image's PATH.
- Each stage is an overlay mount: its upper folder is the stage's layer; FROM a stage stacks
  on that stage's layers. Everything happens in a private mount namespace (unshare), so
  nothing is mounted on this machine itself and nothing outside the scratch folder changes.
- RUN: chrooted into the stage, as its USER, in its WORKDIR, with its ENVs and ARGs (build
  arguments as `--build-arg`); /proc, /sys and /dev are this machine's, /tmp is empty.
- COPY: from the build context (the repository, less what .dockerignore leaves out), or
  `--from` a stage; files owned by root or by `--chown`.
- Then, like `docker run --shm-size=1g` (with a fresh volume on every VOLUME, in a network
  namespace of its own that has only loopback): `fleetlm --help`, fleetlm and torch import
  (torch is the CPU build), the user is not root; unless --no-serve, the ENTRYPOINT and CMD
  start, /health answers, HTTP listens on every interface, HEALTHCHECK passes, a chat
  completion comes back, and SIGTERM (`docker stop`) ends it.

Needs root, unshare(1) and overlayfs. From the repository root:

    python3 deploy/docker/build_without_docker.py --target cpu --build-arg TORCH_INDEX_URL=

(an empty TORCH_INDEX_URL: take torch from the package index pip is set up with).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import dockerfile_reader as dockerfile
from dockerfile_reader import Instruction, Stage

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DOCKERFILE = REPO / "deploy" / "Dockerfile"
# What this machine can stand in for, and the environment that image's config sets.
STAND_IN_BASES = ("python:3.11-slim-bookworm",)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8"}
FIRST_USER_ID = 1000  # Debian's first uid/gid for people; a fresh image has none
NOBODY_ID = 65534
SHM_SIZE = "1g"
SERVE_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 60.0


def main() -> int:
    args = _parser().parse_args()
    if args.phase == "build":
        return _build_phase(args)
    if args.phase == "run":
        return _run_phase(args)
    return _all_phases(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", help="stage to build (default: cpu)")
    parser.add_argument("--file", type=Path, default=DEFAULT_DOCKERFILE, help="the Dockerfile")
    parser.add_argument("--context", type=Path, default=REPO, help="the build context")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="build in DIR and keep it (default: a temporary folder, removed)")
    parser.add_argument("--no-serve", action="store_true",
                        help="check the image's environment only; do not start fleetlm serve")
    parser.add_argument("--phase", choices=("all", "build", "run"), default="all",
                        help=argparse.SUPPRESS)  # the namespaced halves of `all`
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    return parser


def _all_phases(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("build_without_docker: needs root and unshare(1)", file=sys.stderr)
        return 2
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        print(f"build_without_docker: {args.keep} is not empty", file=sys.stderr)
        return 2
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="fleetlm-image-", dir="/var/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for phase, namespaces in (("build", ["--mount"]), ("run", ["--mount", "--net"])):
            started = time.monotonic()
            command = ["unshare", *namespaces, "--propagation", "private", sys.executable,
                       __file__, *sys.argv[1:], "--phase", phase, "--scratch", str(scratch)]
            if subprocess.run(command, check=False).returncode != 0:
                print(f"build_without_docker: the {phase} phase failed", file=sys.stderr)
                return 1
            _log(f"{phase} phase: {time.monotonic() - started:.0f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------ build
class StageBuild:
    """One stage's layer, mounted at `root`, and the image config its instructions set."""

    def __init__(self, stage: Stage, scratch: Path, lowers: list[Path], config: dict):
        self.stage = stage
        self.folder = scratch / f"stage-{stage.index}"
        self.layers = [self.folder / "upper", *lowers]  # top first
        self.root = self.folder / "merged"
        self.config = json.loads(json.dumps(config))  # its own copy of the base's
        self.args: dict[str, str] = {}
        mount_layers(self.layers, self.folder, scratch)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.config["env"]}


def mount_layers(layers: list[Path], folder: Path, scratch: Path) -> Path:
    """Mount `layers` (top first) over the stand-in base at folder/merged, with /proc, /sys,
    /dev and an empty /tmp; returns the mount point."""
    upper, lowers = layers[0], [*layers[1:], stand_in_root(scratch)]
    work, root, tmp = folder / "work", folder / "merged", folder / "tmp"
    for path in (upper, work, root, tmp):
        path.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o1777)
    options = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    _mount("-t", "overlay", "overlay", "-o", options, root)
    for system in ("proc", "sys", "dev"):
        _mount("--rbind", f"/{system}", root / system)
    _mount("-t", "tmpfs", "-o", f"size={SHM_SIZE}", "shm", root / "dev" / "shm")
    _mount("--bind", tmp, root / "tmp")
    return root


def stand_in_root(scratch: Path) -> Path:
    """This machine's root as a fresh base image (without its own people's accounts), mounted
    once per namespace. The stages stack on this mount rather than on / itself, since
    overlayfs refuses lower layers that lie inside one another."""
    folder = scratch / "base"
    root, upper, work = folder / "merged", folder / "upper", folder / "work"
    if os.path.ismount(root):
        return root
    is_new = not upper.exists()
    for path in (upper, work, root):
        path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", root)
    if is_new:
        for name in ("passwd", "group", "shadow", "gshadow"):
            _drop_people(root / "etc" / name, ids_field=None if name.endswith("shadow") else 2)
    return root


def _mount(*args: object) -> None:
    subprocess.run(["mount", *map(str, args)], check=True)


def _build_phase(args: argparse.Namespace) -> int:
    spec = dockerfile.load(args.file)
    build_args = dict(arg.partition("=")[::2] for arg in args.build_arg)
    global_args = {name: build_args.get(name, default or "")
                   for name, default in spec.global_args.items()}
    ignore = dockerfile.read_dockerignore(args.context / ".dockerignore")
    built: dict[str, StageBuild] = {}
    for stage in spec.stages_for(args.target):
        started = time.monotonic()
        base = dockerfile.substitute(stage.base, global_args)
        build = _start_stage(stage, base, built, args.scratch)
        for instruction in stage.instructions:
            _log(f"stage {stage.name or stage.index}, line {instruction.lineno}: "
                 f"{instruction.keyword} {instruction.value[:100]}")
            _carry_out(instruction, build, built, build_args, global_args, args.context, ignore)
        built[stage.name or str(stage.index)] = build
        _log(f"stage {stage.name}: {time.monotonic() - started:.0f} s")
    image = built[args.target]
    (args.scratch / "image.json").write_text(json.dumps(
        {"layers": [str(p) for p in image.layers], "config": image.config}, indent=2))
    return 0


def _start_stage(stage: Stage, base: str, built: dict, scratch: Path) -> StageBuild:
    if base in built:
        parent = built[base]
        return StageBuild(stage, scratch, parent.layers, parent.config)
    if base not in STAND_IN_BASES:
        raise SystemExit(f"this machine cannot stand in for the base image {base} "
                         f"(only {', '.join(STAND_IN_BASES)})")
    config = {"env": dict(BASE_ENV), "user": "0:0", "workdir": "/", "entrypoint": [],
              "cmd": ["python3"], "volumes": [], "expose": [], "healthcheck": None}
    return StageBuild(stage, scratch, [], config)


def _drop_people(path: Path, ids_field: int | None) -> None:
    """Drop the entries with ids from FIRST_USER_ID up (the shadow files: those whose name
    passwd/group no longer has)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if ids_field is None:
        plain = path.parent / ("passwd" if path.name == "shadow" else "group")
        names = {line.split(":")[0] for line in plain.read_text().splitlines()}
        kept = [line for line in lines if line.split(":")[0] in names]
    else:
        kept = [line for line in lines if not _is_person(line.split(":")[ids_field])]
    path.write_text("".join(line + "\n" for line in kept))


def _is_person(raw_id: str) -> bool:
    return raw_id.isdigit() and FIRST_USER_ID <= int(raw_id) < NOBODY_ID


def _carry_out(instruction: Instruction, build: StageBuild, built: dict[str, StageBuild],
               build_args: dict[str, str], global_args: dict[str, str], context: Path,
               ignore: list) -> None:
    keyword, config = instruction.keyword, build.config
    if keyword == "RUN":
        _run_step(instruction, build)
    elif keyword == "COPY":
        _copy(instruction, build, built, context, ignore)
    elif keyword == "ARG":
        name, default = dockerfile.arg_default(instruction.value)
        if default is None:  # a global ARG brought into the stage
            default = global_args.get(name, "")
        build.args[name] = build_args.get(name, dockerfile.substitute(default, build.variables()))
    elif keyword == "ENV":
        for name, value in dockerfile.env_pairs(instruction.value):
            config["env"][name] = dockerfile.substitute(value, build.variables())
    elif keyword == "WORKDIR":
        workdir = dockerfile.substitute(instruction.value, build.variables())
        config["workdir"] = os.path.join(config["workdir"], workdir)
        (build.root / config["workdir"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    elif keyword == "USER":
        config["user"] = dockerfile.substitute(instruction.value, build.variables())
    elif keyword in ("ENTRYPOINT", "CMD"):
        config[keyword.lower()] = instruction.exec_form or ["/bin/sh", "-c", instruction.value]
    elif keyword == "VOLUME":
        config["volumes"] += instruction.exec_form or instruction.value.split()
    elif keyword == "EXPOSE":
        config["expose"] += instruction.value.split()
    elif keyword == "HEALTHCHECK":
        config["healthcheck"] = _healthcheck(instruction)
    elif keyword not in ("LABEL",):
        raise SystemExit(f"line {instruction.lineno}: {keyword} is not supported here")


def _healthcheck(instruction: Instruction) -> list[str] | None:
    kind, _, command = instruction.value.partition(" ")
    if kind.upper() == "NONE":
        return None
    words = dockerfile.Instruction("CMD", command.strip(), {}, instruction.lineno).exec_form
    return words or ["/bin/sh", "-c", command.strip()]


def _run_step(instruction: Instruction, build: StageBuild) -> None:
    argv = instruction.exec_form or ["/bin/sh", "-c", instruction.value]
    env = {**build.args, **build.config["env"]}
    result = subprocess.run(argv, check=False, env=_with_home(env, build.root, build.config),
                            **_inside(build.root, build.config))
    if result.returncode != 0:
        raise SystemExit(f"line {instruction.lineno}: RUN exited with {result.returncode}")


def _inside(root: Path, config: dict) -> dict:
    """subprocess keyword arguments that run a command in the image, as its user, in its
    workdir."""
    uid, gid = user_ids(root, config["user"])
    workdir = config["workdir"]

    def enter() -> None:
        os.chroot(root)
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return {"preexec_fn": enter}


def _with_home(env: dict[str, str], root: Path, config: dict) -> dict[str, str]:
    """Docker sets HOME from the user's passwd entry when the image does not."""
    if "HOME" in env:
        return env
    uid, _ = user_ids(root, config["user"])
    homes = {int(f[2]): f[5] for f in _entries(root / "etc" / "passwd")}
    return {**env, "HOME": homes.get(uid, "/")}


def user_ids(root: Path, user: str) -> tuple[int, int]:
    """USER's `name[:group]` or `uid[:gid]`, looked up in the image's /etc/passwd and group."""
    name, _, group = user.partition(":")
    users = {f[0]: (int(f[2]), int(f[3])) for f in _entries(root / "etc" / "passwd")}
    uid, gid = (int(name), None) if name.isdigit() else users[name]
    if group:
        groups = {f[0]: int(f[2]) for f in _entries(root / "etc" / "group")}
        gid = int(group) if group.isdigit() else groups[group]
    if gid is None:
        gid = next((g for u, g in users.values() if u == uid), uid)
    return uid, gid


def _entries(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line.count(":") >= 2]


def _copy(instruction: Instruction, build: StageBuild, built: dict[str, StageBuild],
          context: Path, ignore: list) -> None:
    words = instruction.exec_form or dockerfile.substitute(
        instruction.value, build.variables()).split()
    sources, destination = words[:-1], words[-1]
    destination = os.path.join(build.config["workdir"], destination)
    owner = user_ids(build.root, instruction.flags["chown"]) if "chown" in instruction.flags \
        else (0, 0)
    into_folder = destination.endswith("/") or len(sources) > 1
    target = build.root / destination.lstrip("/")
    for source in sources:
        if "from" in instruction.flags:
            origin, context_root = built[instruction.flags["from"]].root / source.lstrip("/"), None
        else:
            origin, context_root = context / source, context
            if dockerfile.is_ignored(source, ignore):
                raise SystemExit(f"line {instruction.lineno}: {source} is in .dockerignore")
        if not origin.exists():
            raise SystemExit(f"line {instruction.lineno}: {source} does not exist")
        place = target / origin.name if into_folder and origin.is_file() else target
        _copy_tree(origin, place, owner, context_root, ignore)


def _copy_tree(origin: Path, place: Path, owner: tuple[int, int], context_root: Path | None,
               ignore: list) -> None:
    """Copy a file, or a folder's contents, owned by `owner`; from the context, less what
    .dockerignore leaves out."""
    place.parent.mkdir(parents=True, exist_ok=True)
    if origin.is_file():
        shutil.copy2(origin, place, follow_symlinks=False)
        os.lchown(place, *owner)
        return

    def ignored(folder: str, names: list[str]) -> set[str]:
        if context_root is None:
            return set()
        relative = Path(folder).relative_to(context_root)
        return {n for n in names if dockerfile.is_ignored(str(relative / n), ignore)}

    shutil.copytree(origin, place, symlinks=True, ignore=ignored, dirs_exist_ok=True)
    for folder, folders, files in os.walk(place):
        for name in [folder, *(os.path.join(folder, n) for n in folders + files)]:
            os.lchown(name, *owner)


# -------------------------------------------------------------------------------------- run
def _run_phase(args: argparse.Namespace) -> int:
    image = json.loads((args.scratch / "image.json").read_text())
    config = image["config"]
    container_folder = args.scratch / "container"  # the container's own writable layer on top
    layers = [container_folder / "upper", *map(Path, image["layers"])]
    root = mount_layers(layers, container_folder, args.scratch)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for number, path in enumerate(config["volumes"]):
        _fresh_volume(root / path.lstrip("/"), args.scratch / f"volume-{number}")
    env = _with_home(dict(config["env"]), root, config)
    container = Container(root, config, env)
    container.check_environment()
    if not args.no_serve:
        container.check_serving()
    return 0


def _fresh_volume(path: Path, folder: Path) -> None:
    """Like Docker, fill a new volume with what the image has at its path (owner included)."""
    shutil.copytree(path, folder, symlinks=True)
    stat = path.stat()
    os.chown(folder, stat.st_uid, stat.st_gid)
    _mount("--bind", folder, path)


class Container:
    """The built image run as a container: its user, workdir and environment."""

    def __init__(self, root: Path, config: dict, env: dict[str, str]):
        self.root, self.config, self.env = root, config, env

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, check=False, env=self.env, capture_output=True, text=True,
                              **_inside(self.root, self.config), **kwargs)

    def expect(self, what: str, argv: list[str]) -> str:
        result = self.run(argv, timeout=300)
        if result.returncode != 0:
            raise SystemExit(f"{what}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        _log(f"ok: {what}")
        return result.stdout

    def check_environment(self) -> None:
        self.expect("fleetlm --help", ["fleetlm", "--help"])
        uid = self.expect("id -u", ["id", "-u"]).strip()
        if uid == "0":
            raise SystemExit("the image runs as root")
        probe = "import fleetlm, torch; print(torch.__version__, torch.version.cuda)"
        torch_build = self.expect("import fleetlm, torch", ["python", "-c", probe]).split()
        if torch_build[1] != "None":
            raise SystemExit(f"torch {torch_build[0]} is a CUDA build ({torch_build[1]})")
        _log(f"user {uid}, torch {torch_build[0]} (CPU build)")

    def check_serving(self) -> None:
        command = self.config["entrypoint"] + self.config["cmd"]
        port, model = self._served(self.config["cmd"][-1])
        started = time.monotonic()
        server = subprocess.Popen(command, env=self.env, start_new_session=True,
                                  **_inside(self.root, self.config))
        try:
            _wait_healthy(port, server, started)
            _log(f"ok: {' '.join(command)} answers /health after "
                 f"{time.monotonic() - started:.0f} s")
            _check_listens_everywhere(port)
            if self.config["healthcheck"]:
                self.expect("HEALTHCHECK", self.config["healthcheck"])
            _check_chat(port, model)
            _stop(server)
        finally:
            self._kill_leftovers()

    def _served(self, config_path: str) -> tuple[int, str]:
        """The HTTP port and model id of the config the container serves, read by fleetlm."""
        probe = ("import json, sys; from fleetlm.cluster.config import load_config; "
                 "c = load_config(sys.argv[1]); "
                 "print(json.dumps([c.http.port, c.model.served_model_name or c.model.name]))")
        port, model = json.loads(self.expect("read the served config",
                                             ["python", "-c", probe, config_path]))
        return port, model

    def _kill_leftovers(self) -> None:
        """Whatever still runs inside the container's root (Ray's processes) is killed, as
        when Docker removes a container."""
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.readlink(entry / "root") == str(self.root):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _wait_healthy(port: int, server: subprocess.Popen, started: float) -> None:
    while time.monotonic() - started < SERVE_TIMEOUT_S:
        if server.poll() is not None:
            raise SystemExit(f"fleetlm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(3)
    raise SystemExit(f"no healthy server within {SERVE_TIMEOUT_S:g} s")


def _check_listens_everywhere(port: int) -> None:
    """The HTTP port is bound to 0.0.0.0 (reachable through `docker run -p`)."""
    wanted = f"00000000:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    if not any(row[1] == wanted and row[3] == "0A" for row in rows):  # 0A: LISTEN
        raise SystemExit(f"nothing listens on 0.0.0.0:{port}")
    _log(f"ok: listening on 0.0.0.0:{port}")


def _check_chat(port: int, model: str) -> None:
    body = {"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    if not answer.strip():
        raise SystemExit("the chat completion came back empty")
    _log(f"ok: chat completion: {answer!r}")


def _stop(server: subprocess.Popen) -> None:
    """`docker stop`: SIGTERM to the entrypoint, which shuts Serve and Ray down."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"fleetlm serve did not stop within {STOP_TIMEOUT_S:g} s") from None
    _log(f"ok: stopped by SIGTERM (exit {server.returncode})")


def _log(message: str) -> None:
    print(f"[build_without_docker] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
