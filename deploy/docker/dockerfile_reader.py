"""Read a Dockerfile and a .dockerignore the way Docker does (the parts deploy/Dockerfile uses).

Shared by build_without_docker.py, which carries the instructions out, and by
tests/deploy/test_dockerfile.py, which checks them. Standard library only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_CONTINUATION = re.compile(r"\\\s*$")
_FLAG = re.compile(r"--([a-z-]+)(?:=(\S*))?")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # what follows the keyword and its --flags
    flags: dict[str, str]
    lineno: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of RUN/CMD/ENTRYPOINT/VOLUME `[...]`, or None for the shell form."""
        if not self.value.startswith("["):
            return None
        try:
            words = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return words if isinstance(words, list) else None


@dataclass
class Stage:
    index: int
    base: str  # an image, or the name of an earlier stage (unsubstituted)
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def copies_from(self) -> list[str]:
        return [i.flags["from"] for i in self.instructions if i.keyword == "COPY"
                and "from" in i.flags]


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]  # the ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name or str(stage.index) == name:
                return stage
        raise ValueError(f"no stage named {name!r}")

    def stages_for(self, target: str) -> list[Stage]:
        """The target and every stage it builds on or copies from, in file order."""
        names = {stage.name for stage in self.stages}
        needed: set[int] = set()
        pending = [self.stage(target)]
        while pending:
            stage = pending.pop()
            if stage.index in needed:
                continue
            needed.add(stage.index)
            for other in [stage.base, *stage.copies_from()]:
                if other in names:
                    pending.append(self.stage(other))
        return [stage for stage in self.stages if stage.index in needed]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with continuations joined and comment lines dropped."""
    lines: list[tuple[int, str]] = []
    current, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.lstrip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        if not current:
            start = number
        if _CONTINUATION.search(raw):
            current += _CONTINUATION.sub("", raw) + " "
            continue
        current += raw
        if current.strip():
            lines.append((start, current.strip()))
        current = ""
    if current.strip():
        lines.append((start, current.strip()))
    return lines


def parse_instruction(lineno: int, line: str) -> Instruction:
    keyword, _, rest = line.partition(" ")
    flags: dict[str, str] = {}
    rest = rest.strip()
    while match := _FLAG.match(rest):
        flags[match[1]] = match[2] or ""
        rest = rest[match.end():].lstrip()
    return Instruction(keyword.upper(), rest, flags, lineno)


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for lineno, line in logical_lines(text):
        instruction = parse_instruction(lineno, line)
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(len(stages), words[0], name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {lineno}: only ARG may come before the first FROM")
            global_args.update([arg_default(instruction.value)])
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def load(path: Path) -> Dockerfile:
    return parse(path.read_text())


def arg_default(value: str) -> tuple[str, str | None]:
    name, is_set, default = value.partition("=")
    return name.strip(), _unquote(default) if is_set else None


def env_pairs(value: str) -> list[tuple[str, str]]:
    """ENV's `A=1 B="x y"` (or the old `A 1`) as pairs; values still unsubstituted."""
    if "=" not in value.split()[0]:
        name, _, rest = value.partition(" ")
        return [(name, rest.strip())]
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\'[^\']*\'|\S*)', value)
    return [(name, _unquote(raw)) for name, raw in pairs]


def substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's `$A`, `${A}`, `${A:-default}` and `${A:+alternative}`."""
    def replace(match: re.Match) -> str:
        name = match[1] or match[4]
        value = variables.get(name, "")
        if match[2] == "-":
            return value or match[3]
        if match[2] == "+":
            return match[3] if value else ""
        return value
    return _VARIABLE.sub(replace, text)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


# ---------------------------------------------------------------------------- .dockerignore
@dataclass(frozen=True)
class IgnoreRule:
    pattern: re.Pattern
    is_exception: bool  # a `!pattern` line: put back what an earlier line left out


def read_dockerignore(path: Path) -> list[IgnoreRule]:
    if not path.is_file():
        return []
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        is_exception = line.startswith("!")
        rules.append(IgnoreRule(_pattern_regex(line.lstrip("!")), is_exception))
    return rules


def is_ignored(relative_path: str, rules: list[IgnoreRule]) -> bool:
    """Whether the build context leaves the path out: the last rule that matches the path or a
    folder above it decides."""
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    is_out = False
    for rule in rules:
        if any(rule.pattern.fullmatch(prefix) for prefix in prefixes):
            is_out = not rule.is_exception
    return is_out


def _pattern_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip().removeprefix("./").strip("/")
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)
