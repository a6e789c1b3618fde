"""The `fleetlm` command line: argument parsing, config errors, the bench hand-off.

Commands that need a Ray cluster are exercised by hand and through the app tests; these
tests stop before Ray is touched.
"""

from __future__ import annotations

import pytest

from fleetlm import cli


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """`main` may choose Ray's auth mode in os.environ; keep that out of the test session."""
    monkeypatch.setattr(cli, "_use_saved_ray_token", lambda: None)


def test_serve_defaults_to_the_default_config():
    args = cli.build_parser().parse_args(["serve"])
    assert (args.command, args.config, args.address) == ("serve", cli.DEFAULT_CONFIG, None)


def test_deploy_needs_a_config():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["deploy"])


def test_shutdown_takes_an_app_and_an_address():
    args = cli.build_parser().parse_args(["shutdown", "--app", "x", "--address", "h:1"])
    assert (args.app, args.address) == ("x", "h:1")


def test_a_bad_config_fails_before_ray_with_the_key_and_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("http:\n  prot: 1\n")
    assert cli.main(["deploy", str(path)]) == 1
    error = capsys.readouterr().err
    assert str(path) in error and "unknown key 'http.prot'" in error


def test_a_missing_config_is_reported(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml" in capsys.readouterr().err


def test_bench_hands_its_arguments_to_the_bench_cli(monkeypatch):
    import fleetlm.bench.cli as bench_cli

    seen = []
    monkeypatch.setattr(bench_cli, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["bench", "serve", "--help-me"]) == 7
    assert seen == [["serve", "--help-me"]]


def test_an_impossible_split_fails_before_ray(tmp_path, capsys, monkeypatch):
    from fleetlm.cluster import launcher

    monkeypatch.setattr(launcher, "connect", lambda *args, **kwargs: pytest.fail("Ray touched"))
    path = tmp_path / "tp2.yaml"
    path.write_text("parallel:\n  tensor_parallel_size: 2\n")
    assert cli.main(["serve", str(path)]) == 1
    error = capsys.readouterr().err
    assert f"{path}: parallel: tensor_parallel_size 2 does not divide 9 attention heads" in error
