"""The `fleetlm` command line: argument parsing, flags over YAML over defaults, `config
show`, config errors, the bench hand-off.

These tests stop before Ray is touched; test_serve_cli.py starts real servers.
"""

from __future__ import annotations

import pytest
import yaml

from fleetlm import cli
from fleetlm.cluster.config import ClusterConfig, parse_config
from fleetlm.cluster.flags import FLAT_SECTIONS, PREFIXED_SECTIONS, flag_name


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """`main` may choose Ray's auth mode in os.environ; keep that out of the test session."""
    monkeypatch.setattr(cli, "_use_saved_ray_token", lambda: None)


def _config(*argv: str) -> ClusterConfig:
    """The config `fleetlm serve ARGV` would deploy."""
    return cli._load(cli.build_parser().parse_args(["serve", *argv]))


def test_serve_without_arguments_is_the_built_in_model_on_localhost():
    config = _config()
    assert config == ClusterConfig()
    assert (config.model.name, config.http.host, config.http.port) == (
        "smollm2-135m-instruct", "127.0.0.1", 8000)


def test_a_model_argument_is_served_under_its_own_name(tmp_path):
    config = _config(str(tmp_path / "m.gguf"), "--port", "8123")
    assert (config.model.name, config.model.served_name) == ((str(tmp_path / "m.gguf"),) * 2)
    assert config.http.port == 8123


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("engine: {max_num_seqs: 8, block_size: 32}\nhttp: {port: 9000}\n")
    config = _config(str(path), "--port", "9100", "--block-size", "8", "--api-key", "k1",
                     "--api-key", "k2", "--no-enable-prefix-caching", "--enable-expert-parallel",
                     "--kv-cache-memory-bytes", "64MiB", "--data-parallel-size", "2")
    assert (config.http.port, config.engine.block_size) == (9100, 8)  # flag > file
    assert config.engine.max_num_seqs == 8  # file > default
    assert config.engine.max_num_batched_tokens == ClusterConfig().engine.max_num_batched_tokens
    assert config.http.api_keys == ["k1", "k2"]
    assert (config.engine.enable_prefix_caching, config.parallel.enable_expert_parallel) == (
        False, True)
    assert (config.engine.kv_cache_memory_bytes, config.replicas.count) == (64 << 20, 2)


def test_every_setting_has_a_flag_with_its_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no line breaks inside descriptions
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    fields = ClusterConfig.model_fields
    for section in FLAT_SECTIONS + PREFIXED_SECTIONS:
        for key, field in fields[section].annotation.model_fields.items():
            if (section, key) != ("model", "name"):
                assert flag_name((section, key)) in help_text
                assert field.description in help_text
    for flag in ("--tensor-parallel-size", "--max-model-len", "--served-model-name",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--api-key",
                 "--quantization", "--speculative-config"):  # vllm serve's names
        assert flag in help_text


def test_config_show_prints_yaml_that_loads_back(tmp_path, capsys):
    argv = ["--max-model-len", "512", "--speculative-config", '{"method": "ngram"}',
            "--pipeline-layer-partition", "30"]
    assert cli.main(["config", "show", *argv]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert next(iter(shown)) == "name"
    assert shown["model"]["max_model_len"] == 512
    assert parse_config(shown, "shown") == _config(*argv)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "99999"], "http.port (--port): Input should be less than or equal to 65535"),
    (["--max-num-seqs", "0"], "engine.max_num_seqs (--max-num-seqs)"),
    (["--quantization", "awq"], "model.quantization (--quantization): 'awq' is not supported"),
    (["/models/folder", "--quantization", "gguf"], "quantization gguf needs a .gguf model"),
    (["--speculative-config", '{"lookahead": 2}'],
     "unknown key 'speculative.lookahead (--speculative-config)'"),
])
def test_bad_flags_name_the_key_and_the_flag(argv, message, capsys):
    assert cli.main(["config", "show", *argv]) == 1
    assert message in capsys.readouterr().err


def test_gguf_quantization_is_accepted_for_a_gguf_file():
    assert _config("/models/x.gguf", "--quantization", "gguf").model.quantization == "gguf"


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
