"""Compiling, caching and loading C kernels, and falling back when that fails."""

from __future__ import annotations

import logging
import threading

import pytest

from fleetlm.kernels import cpu_build

SOURCE = "int fleet_answer(int x) { return 2 * x + 1; }\n"
FLAGS = ("-O1", "-shared", "-fPIC")


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "answer.c"
    path.write_text(SOURCE)
    return path


@pytest.fixture
def has_compiler():
    try:
        cpu_build.find_compiler()
    except cpu_build.BuildError:
        pytest.skip("no C compiler here")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_build.CACHE_DIR_ENV, str(tmp_path))
    assert cpu_build.cache_dir() == tmp_path / "kernels"


def test_library_path_is_keyed_by_source_headers_compiler_and_flags(source):
    first = cpu_build.library_path(source, "/usr/bin/cc", FLAGS)
    assert first == cpu_build.library_path(source, "/usr/bin/cc", FLAGS)
    assert first.parent == cpu_build.cache_dir()
    assert first != cpu_build.library_path(source, "/usr/bin/clang", FLAGS)
    assert first != cpu_build.library_path(source, "/usr/bin/cc", FLAGS[1:])
    source.with_name("helpers.h").write_text("#define TWO 2\n")
    with_header = cpu_build.library_path(source, "/usr/bin/cc", FLAGS)
    assert with_header != first
    source.write_text(SOURCE + "\n")
    assert with_header != cpu_build.library_path(source, "/usr/bin/cc", FLAGS)


def test_load_compiles_once_then_reuses_the_cache(source, has_compiler, monkeypatch):
    library = cpu_build.load(source, FLAGS)
    assert library.fleet_answer(20) == 41
    [built] = list(cpu_build.cache_dir().iterdir())  # no temporary files left behind

    def refuse(*args):
        raise AssertionError("recompiled a cached library")

    monkeypatch.setattr(cpu_build, "_compile", refuse)
    assert cpu_build.build(source, FLAGS) == built


def test_concurrent_builds_leave_one_whole_library(source, has_compiler):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cpu_build.build(source, FLAGS)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and len(paths) == 3
    assert list(cpu_build.cache_dir().iterdir()) == [paths[0]]
    assert cpu_build.load(source, FLAGS).fleet_answer(1) == 3


def test_missing_compiler_warns_and_returns_none(source, monkeypatch, caplog):
    monkeypatch.setenv(cpu_build.COMPILER_ENV, "no-such-cc-fleetlm")
    with caplog.at_level(logging.WARNING, logger=cpu_build.__name__):
        assert cpu_build.load(source, FLAGS) is None
    assert "no C compiler found" in caplog.text


def test_compile_error_warns_with_the_compiler_message(source, has_compiler, caplog):
    source.write_text("int broken( {\n")
    with caplog.at_level(logging.WARNING, logger=cpu_build.__name__):
        assert cpu_build.load(source, FLAGS) is None
    assert "answer.c" in caplog.text and "error" in caplog.text
    assert not list(cpu_build.cache_dir().iterdir())


def test_a_linked_source_is_compiled_in_and_keys_the_library(source, has_compiler):
    """A library built with `linked` sources calls their functions, and a changed linked
    source builds a new library."""
    helper = source.with_name("twice.c")
    helper.write_text("int fleet_twice(int x) { return 2 * x; }\n")
    main = source.with_name("main.c")
    main.write_text("int fleet_twice(int x);\n"
                    "int fleet_quad(int x) { return fleet_twice(fleet_twice(x)); }\n")
    library = cpu_build.load(main, FLAGS, linked=(helper,))
    assert library.fleet_quad(5) == 20
    first = cpu_build.library_path(main, "/usr/bin/cc", FLAGS, (helper,))
    assert first != cpu_build.library_path(main, "/usr/bin/cc", FLAGS)
    helper.write_text("int fleet_twice(int x) { return x + x; }\n")
    assert first != cpu_build.library_path(main, "/usr/bin/cc", FLAGS, (helper,))
