"""W8A8 tensor-parallel layers at world size 2 (gloo processes), loading their shards of an
int8 compressed-tensors file: column-parallel layers equal one rank's exactly (each rank
quantizes the same whole input); a row-parallel layer's ranks quantize their own share of the
input, so it equals the sum of the per-shard references and is near the one-rank result."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from safetensors.torch import load_file, save_file

from fleetlm.executor.models.ops import GatedMLP
from fleetlm.executor.weights import ReadCounter
from fleetlm.executor.weights.compressed import iterate_compressed_weights
from fleetlm.executor.weights.quantize import quantize_weight
from fleetlm.kernels import int8_linear
from fleetlm.parallel.group import SINGLE_PROCESS
from fleetlm.parallel.layers import QKVParallelLinear, RowParallelLinear

pytestmark = pytest.mark.slow  # spawns two gloo ranks: about 45 s on 2 busy cores
HIDDEN, FFN, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS = 64, 96, 8, 4, 2
TP = 2


def _float_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (NUM_HEADS * HEAD_DIM, HIDDEN), "k": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
              "v": (NUM_KV_HEADS * HEAD_DIM, HIDDEN), "row": (HIDDEN, FFN),
              "gate": (FFN, HIDDEN), "up": (FFN, HIDDEN), "down": (HIDDEN, FFN)}
    return {f"{name}.weight": torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def _int8_file(folder) -> None:
    tensors = {}
    for name, weight in _float_weights().items():
        tensors[name], tensors[f"{name}_scale"] = quantize_weight(weight)
    tensors["row.bias"] = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    save_file(tensors, folder / "model.safetensors")


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, HIDDEN, generator=g), torch.randn(5, FFN, generator=g)


def _run(groups, path: str) -> dict:
    tp = groups.tp
    counter = ReadCounter()
    lazy = dict(iterate_compressed_weights(path, progress=False, counter=counter))
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, tp=tp)
    for shard in "qkv":
        qkv.weight.weight_loader(qkv.weight, lazy[f"{shard}.weight"], shard)
    row = RowParallelLinear(FFN, HIDDEN, bias=True, tp=tp)
    row.weight.weight_loader(row.weight, lazy["row.weight"])
    row.bias.weight_loader(row.bias, lazy["row.bias"])
    mlp = GatedMLP(HIDDEN, FFN, tp)
    mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, lazy["gate.weight"], 0)
    mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, lazy["up.weight"], 1)
    mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, lazy["down.weight"])
    x, ffn_in = _inputs()
    with torch.inference_mode():
        return {"qkv": qkv(x), "row": row(ffn_in.chunk(tp.world_size, -1)[tp.rank]),
                "mlp": mlp(x), "is_int8": all(
                    hasattr(m.weight, "quantized") and m.weight.numel() == 0
                    for m in (qkv, row, mlp.gate_up_proj, mlp.down_proj)),
                "bytes_read": counter.num_bytes}


def test_w8a8_layers_split_over_two_ranks(tmp_path):
    _int8_file(tmp_path)
    one = _run(_Single(), str(tmp_path))
    ranks = run_ranks(_run, str(tmp_path), tp=TP)
    assert one["is_int8"] and all(out["is_int8"] for out in ranks)
    # Column-parallel: each rank's heads are exactly the one-rank result's.
    q, kv = NUM_HEADS * HEAD_DIM // TP, NUM_KV_HEADS * HEAD_DIM // TP
    full_q, full_k, full_v = one["qkv"].split([2 * q, 2 * kv, 2 * kv], dim=-1)
    for rank, out in enumerate(ranks):
        ours_q, ours_k, ours_v = out["qkv"].split([q, kv, kv], dim=-1)
        assert torch.equal(ours_q, full_q[:, rank * q:(rank + 1) * q])
        assert torch.equal(ours_k, full_k[:, rank * kv:(rank + 1) * kv])
        assert torch.equal(ours_v, full_v[:, rank * kv:(rank + 1) * kv])
    # Row-parallel: the sum over ranks of each rank's own quantization of its input share.
    weights = {name: quantize_weight(w) for name, w in _float_weights().items()}
    data, scale = weights["row.weight"]
    _, ffn_in = _inputs()
    expected = torch.zeros(5, HIDDEN)
    for rank in range(TP):
        columns = slice(rank * FFN // TP, (rank + 1) * FFN // TP)
        xq, xs = int8_linear.quantize_rows_reference(ffn_in[:, columns].contiguous())
        expected += int8_linear.gemm_reference(xq, xs, data[:, columns], scale[:, 0])
    expected += load_file(tmp_path / "model.safetensors")["row.bias"]
    for out in ranks:
        torch.testing.assert_close(out["row"], expected, rtol=1e-5, atol=1e-5)
        for name in ("row", "mlp"):  # other activation scales: within int8 rounding
            assert (out[name] - one[name]).norm() < 0.02 * one[name].norm()
    # Each rank reads about half of the int8 bytes (plus every scale), not the whole file.
    assert all(out["bytes_read"] < 0.6 * one["bytes_read"] + 4 * 1024 for out in ranks)


class _Single:
    """The groups of one process (what run_ranks hands each rank)."""

    tp = SINGLE_PROCESS
