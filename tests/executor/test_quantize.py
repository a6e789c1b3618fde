"""`fleetlm quantize --scheme W8A8` (and FP8_DYNAMIC) on a small random Llama: the checkpoint
it writes is what compressed-tensors (and transformers through it) reads as W8A8 INT8 (FP8),
fleetlm loads it with its matrices kept int8 (float8), and the settings and the reader refuse
what fleetlm does not run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fleetlm import LLM, SamplingParams
from fleetlm.cli import main
from fleetlm.cluster.config import load_config, to_engine_config
from fleetlm.executor.settings import ModelSection
from fleetlm.executor.weights import load_tokenizer
from fleetlm.executor.weights.quantize import quantize_weight
from fleetlm.kernels.fp8_linear import Fp8Matrix
from fleetlm.kernels.int8_linear import Int8Matrix
from fleetlm.parallel.layers import weight_bytes

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 256, "vocab_size": 49152, "tie_word_embeddings": False,
         "architectures": ["LlamaForCausalLM"]}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [1, 504, 3458, 282, 4649, 314, 9729, 30, 476, 260, 2341, 1351]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, builtin_dir):
    folder = tmp_path_factory.mktemp("float-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    model.save_pretrained(folder)
    load_tokenizer(builtin_dir).save_pretrained(folder)
    return folder


def _quantized(float_dir, tmp_path_factory, scheme: str):
    out = tmp_path_factory.mktemp(scheme) / "out"
    assert main(["quantize", str(float_dir), str(out), "--scheme", scheme]) == 0
    return out


@pytest.fixture(scope="module")
def w8a8_dir(float_dir, tmp_path_factory):
    return _quantized(float_dir, tmp_path_factory, "W8A8")


@pytest.fixture(scope="module")
def fp8_dir(float_dir, tmp_path_factory):
    return _quantized(float_dir, tmp_path_factory, "FP8_DYNAMIC")


def _linear_weight_names():
    """The checkpoint names of every Linear weight the schemes quantize."""
    for layer in range(SMALL["num_hidden_layers"]):
        for proj in LINEARS:
            part = "self_attn" if proj in LINEARS[:4] else "mlp"
            yield f"model.layers.{layer}.{part}.{proj}.weight"


def test_the_checkpoint_holds_int8_weights_with_row_scales(float_dir, w8a8_dir):
    files = {p.name for p in w8a8_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    source, written = load_file(float_dir / "model.safetensors"), load_file(
        w8a8_dir / "model.safetensors")
    for name in _linear_weight_names():
        assert written[name].dtype == torch.int8
        scale = written[f"{name}_scale"]
        assert scale.shape == (source[name].shape[0], 1) and scale.dtype == torch.float32
        error = written[name].float() * scale - source[name]
        assert (error.abs() <= scale / 2 + 1e-7).all()  # rounded to nearest
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(written[name], source[name])  # left in float, as LLM Compressor does


def test_compressed_tensors_reads_it_as_w8a8(float_dir, w8a8_dir):
    """compressed-tensors' own config model, observer and quantizer agree with every byte."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    config = json.loads((w8a8_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "int-quantized" and parsed.quantization_status == "compressed"
    scheme = parsed.config_groups["group_0"]
    preset = ct.quantization.preset_name_to_scheme("W8A8", ["Linear"])  # LLM Compressor's
    for ours, theirs in ((scheme.weights, preset.weights),
                         (scheme.input_activations, preset.input_activations)):
        # the preset leaves the observer to LLM Compressor, which writes minmax for weights
        assert ours.model_dump(exclude={"observer"}) == theirs.model_dump(exclude={"observer"})
    assert scheme.targets == ["Linear"] and parsed.ignore == ["lm_head"]
    source, written = load_file(float_dir / "model.safetensors"), load_file(
        w8a8_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    scale, _ = calculate_qparams(source[name].amin(1, keepdim=True),
                                 source[name].amax(1, keepdim=True), scheme.weights)
    assert torch.equal(written[f"{name}_scale"], scale)
    assert torch.equal(written[name], quantize(source[name], scale, None, scheme.weights,
                                               dtype=torch.int8))


def test_transformers_with_compressed_tensors_and_fleetlm_agree(w8a8_dir):
    """transformers loads the folder through compressed-tensors (int8 weights, per-token int8
    activations, its own fake quantization); fleetlm runs the int8 kernel on the same file."""
    pytest.importorskip("compressed_tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(w8a8_dir, dtype=torch.float32)
    q_proj = hf.model.layers[0].self_attn.q_proj  # compressed until the first forward
    assert q_proj.weight.dtype == torch.int8
    hf_q, hf_scale = q_proj.weight.clone(), q_proj.weight_scale.clone()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0, :-1]
    theirs = torch.log_softmax(logits, -1).gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]

    llm = LLM(str(w8a8_dir), dtype="float32", kv_cache_memory_bytes=16 << 20)
    model = llm.engine.executor.runner.model
    layer = model.layers["0"]
    for weight in (layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                   layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight):
        assert isinstance(weight.quantized, Int8Matrix) and weight.numel() == 0
    qkv = layer.self_attn.qkv_proj.weight
    rows = hf_q.shape[0]
    assert torch.equal(qkv.quantized.data[:rows], hf_q)
    assert torch.equal(qkv.quantized.scale[:rows], hf_scale[:, 0])
    assert weight_bytes(qkv) == qkv.quantized.shape.numel() + 4 * qkv.quantized.shape[0]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    ours = torch.tensor([entry[0][1] for entry in out[0].prompt_logprobs[1:]])
    # compressed-tensors rounds activations with max|x| / 127.5 into [-128, 127], fleetlm with
    # max|x| / 127 into [-127, 127] (as vLLM does): the same weights, slightly different
    # activation rounding. Measured: max difference 0.0022 nats (and 0.0027 from the float
    # model: a random model's logits are small, which the int8 matrices' equality above makes
    # up for).
    assert (ours - theirs).abs().max() < 0.01


def test_quantization_is_detected_and_insisted_on(float_dir, w8a8_dir):
    detected = LLM(str(w8a8_dir), dtype="float32", quantization="compressed-tensors",
                   kv_cache_memory_bytes=16 << 20)
    assert isinstance(detected.engine.executor.runner.model.layers["1"].mlp.down_proj.weight
                      .quantized, Int8Matrix)
    with pytest.raises(ValueError, match="needs a checkpoint quantized so"):
        LLM(str(float_dir), dtype="float32", quantization="compressed-tensors",
            kv_cache_memory_bytes=16 << 20)


@pytest.mark.parametrize("value,message", [
    ("awq", "'awq' is not supported"),
    ("fp8", "W8A8 INT8 checkpoints \\(compressed-tensors; FP8 W8A8 too\\)"),
])
def test_unsupported_quantization_settings_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        ModelSection(name="/models/folder", quantization=value)


def test_the_yaml_key_reaches_the_engine(w8a8_dir, tmp_path):
    path = tmp_path / "w8a8.yaml"
    path.write_text(f"model:\n  name: {w8a8_dir}\n  quantization: compressed-tensors\n")
    assert to_engine_config(load_config(path)).model.quantization == "compressed-tensors"
    path.write_text("model:\n  name: /m\n  quantization: int4\n")
    with pytest.raises(ValueError, match="model.quantization.*'int4' is not supported"):
        load_config(path)


def test_compressed_tensors_needs_a_folder():
    assert ModelSection(name="/m", quantization="compressed-tensors").quantization
    for name in ("smollm2-135m-instruct", "/m/model.gguf"):
        with pytest.raises(ValueError, match="needs a Hugging Face model folder"):
            ModelSection(name=name, quantization="compressed-tensors")


def _variant(w8a8_dir, tmp_path, edit) -> str:
    folder = tmp_path / "variant"
    shutil.copytree(w8a8_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(quant_method="awq"), "quantization 'awq' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     "input_activations.dynamic is False; W8A8 INT8 needs True"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4),
     "weights.num_bits is 4"),
    (lambda q: q["config_groups"]["group_0"].update(format="pack-quantized"),
     "format 'pack-quantized' is not supported"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen'"),
])
def test_checkpoints_of_other_schemes_are_refused_with_the_reason(w8a8_dir, tmp_path, edit,
                                                                  message):
    with pytest.raises(ValueError, match=message):
        LLM(_variant(w8a8_dir, tmp_path, edit), dtype="float32", kv_cache_memory_bytes=16 << 20)


def test_a_static_activation_scale_in_the_file_is_refused(w8a8_dir, tmp_path):
    folder = _variant(w8a8_dir, tmp_path, lambda q: None)
    path = f"{folder}/model.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["model.layers.0.mlp.down_proj.input_scale"] = torch.ones(1)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="static activation scales"):
        LLM(folder, dtype="float32", kv_cache_memory_bytes=16 << 20)


def test_quantize_refuses_what_it_cannot_write(w8a8_dir, tmp_path, capsys):
    assert main(["quantize", str(w8a8_dir), str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(w8a8_dir), str(tmp_path / "x"), "--scheme", "W4A16"])


def test_quantize_weight_keeps_zero_rows_finite():
    q, scale = quantize_weight(torch.zeros(2, 8))
    assert not q.any() and (scale == torch.finfo(torch.float32).eps).all()


# ---- SmoothQuant ------------------------------------------------------------------------------

CALIBRATION = ["Hello there, how are you?", "1, 2, 3, 4, 5,", "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def outlier_dir(float_dir, tmp_path_factory):
    """The small model with an activation outlier: one channel of every norm weight 100x, as
    real models have a few channels far above the rest (SmolLM2 does)."""
    folder = tmp_path_factory.mktemp("outlier-llama")
    for path in float_dir.iterdir():
        shutil.copy(path, folder / path.name)
    weights = load_file(folder / "model.safetensors")
    for name in weights:
        if name.endswith("layernorm.weight"):
            weights[name][7] *= 100.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_smoothing_keeps_the_float_model_s_function(outlier_dir):
    from fleetlm.executor.weights.quantize import smooth

    model = transformers.AutoModelForCausalLM.from_pretrained(outlier_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits
    smoothed = smooth(outlier_dir, 0.5, CALIBRATION)
    names = {f"model.layers.0.{name}.weight" for name in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names <= set(smoothed)
    state = model.state_dict()
    assert not torch.allclose(smoothed["model.layers.0.input_layernorm.weight"],
                              state["model.layers.0.input_layernorm.weight"])
    model.load_state_dict({**state, **smoothed})
    with torch.no_grad():
        got = model(torch.tensor([PROMPT])).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_smoothquant_checkpoint_is_closer_to_float_than_plain_w8a8(outlier_dir, tmp_path):
    """Per-token int8 scales lose an outlier channel's neighbours; SmoothQuant moves the
    outlier into the weights (per-row scales), so the int8 model stays near the float one."""
    plain, smoothed = tmp_path / "plain", tmp_path / "smoothed"
    assert main(["quantize", str(outlier_dir), str(plain)]) == 0
    assert main(["quantize", str(outlier_dir), str(smoothed), "--smoothquant", "0.5"]) == 0
    config = json.loads((smoothed / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8

    def prompt_logprobs(folder) -> torch.Tensor:
        with LLM(str(folder), dtype="float32", kv_cache_memory_bytes=16 << 20) as llm:
            out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                        prompt_logprobs=0))
        return torch.tensor([entry[0][1] for entry in out[0].prompt_logprobs[1:]])

    reference = prompt_logprobs(outlier_dir)
    plain_error = (prompt_logprobs(plain) - reference).abs().mean()
    smoothed_error = (prompt_logprobs(smoothed) - reference).abs().mean()
    assert smoothed_error < 0.5 * plain_error, (smoothed_error, plain_error)


def test_smoothquant_strength_is_checked(float_dir, tmp_path):
    from fleetlm.executor.weights.quantize import quantize_checkpoint

    with pytest.raises(ValueError, match="must be in"):
        quantize_checkpoint(str(float_dir), tmp_path / "x", smoothquant=1.5)


def test_smoothquant_refuses_a_model_without_its_mappings(tmp_path, builtin_dir):
    """A mixture-of-experts layer has no dense gate/up/down projections to smooth."""
    folder = tmp_path / "moe"
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2,
        num_experts_per_tok=1, vocab_size=49152, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(builtin_dir).save_pretrained(folder)
    from fleetlm.executor.weights.quantize import quantize_checkpoint

    with pytest.raises(ValueError, match="dense Llama-family layer"):
        quantize_checkpoint(str(folder), tmp_path / "out", smoothquant=0.5)


def test_compressed_tensors_reads_the_fp8_checkpoint_as_fp8_dynamic(float_dir, fp8_dir):
    """LLM Compressor's FP8_DYNAMIC preset: float8 e4m3 weights with a scale per row, written
    byte for byte as compressed-tensors' own observer and quantizer compute them."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    config = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "float-quantized" and parsed.ignore == ["lm_head"]
    scheme = parsed.config_groups["group_0"]
    preset = ct.quantization.preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    for ours, theirs in ((scheme.weights, preset.weights),
                         (scheme.input_activations, preset.input_activations)):
        assert ours.model_dump(exclude={"observer"}) == theirs.model_dump(exclude={"observer"})
    source, written = load_file(float_dir / "model.safetensors"), load_file(
        fp8_dir / "model.safetensors")
    for name in _linear_weight_names():
        assert written[name].dtype == torch.float8_e4m3fn
        scale, _ = calculate_qparams(source[name].amin(1, keepdim=True),
                                     source[name].amax(1, keepdim=True), scheme.weights)
        assert torch.equal(written[f"{name}_scale"], scale)
        assert torch.equal(written[name].view(torch.uint8), quantize(
            source[name], scale, None, scheme.weights,
            dtype=torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(written["lm_head.weight"], source["lm_head.weight"])


def test_transformers_with_compressed_tensors_and_fleetlm_agree_on_fp8(fp8_dir):
    """fleetlm keeps the float8 matrices (one byte a weight) and multiplies them with
    `torch._scaled_mm`; transformers runs compressed-tensors' fake quantization of the same
    file: the same per-token activation rounding, so the same logprobs."""
    pytest.importorskip("compressed_tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0, :-1]
    theirs = torch.log_softmax(logits, -1).gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    llm = LLM(str(fp8_dir), dtype="float32", kv_cache_memory_bytes=16 << 20)
    layer = llm.engine.executor.runner.model.layers["1"]
    for weight in (layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                   layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight):
        assert isinstance(weight.quantized, Fp8Matrix) and weight.numel() == 0
        assert weight_bytes(weight) == weight.quantized.shape.numel() * 1 + 4 * (
            weight.quantized.shape[0])
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    ours = torch.tensor([entry[0][1] for entry in out[0].prompt_logprobs[1:]])
    assert (ours - theirs).abs().max() < 0.01


@pytest.mark.gpu
def test_fp8_checkpoint_on_cuda_runs_the_fp8_gemm(fp8_dir):
    """On CUDA the float8 matrices stay on the GPU and `torch._scaled_mm` runs Hopper's FP8
    GEMM (bf16 out); the logprobs are the CPU run's up to bf16 rounding."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    runs = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        llm = LLM(str(fp8_dir), dtype=dtype, device=device, kv_cache_memory_bytes=16 << 20)
        weight = llm.engine.executor.runner.model.layers["0"].mlp.gate_up_proj.weight
        assert isinstance(weight.quantized, Fp8Matrix)
        assert weight.quantized.data.device.type == device
        out = llm.generate([PROMPT], params)
        runs[device] = torch.tensor([entry[0][1] for entry in out[0].prompt_logprobs[1:]])
    assert (runs["cuda"] - runs["cpu"]).abs().max() < 0.05


def _two_schemes(quantization_config: dict) -> None:
    group = json.loads(json.dumps(quantization_config["config_groups"]["group_0"]))
    group["format"] = "float-quantized"
    for field in ("weights", "input_activations"):
        group[field]["type"] = "float"
    quantization_config["config_groups"]["group_1"] = group


def test_a_checkpoint_mixing_schemes_is_refused(w8a8_dir, tmp_path):
    with pytest.raises(ValueError, match="mixes schemes"):
        LLM(_variant(w8a8_dir, tmp_path, _two_schemes), dtype="float32",
            kv_cache_memory_bytes=16 << 20)
