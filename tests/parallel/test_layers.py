"""Each tensor-parallel layer at world size 2 and 3 (gloo processes) equals its unsharded
version in float32, loading its shard from a lazily read safetensors file."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from safetensors.torch import save_file

from fleetlm.executor.models.ops import GatedMLP
from fleetlm.executor.weights import ReadCounter, iterate_weights
from fleetlm.parallel.group import SINGLE_PROCESS
from fleetlm.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

HIDDEN, FFN, HEAD_DIM, NUM_HEADS, VOCAB = 24, 36, 4, 6, 50  # VOCAB splits unevenly over 3
ATOL, RTOL = 1e-5, 1e-5  # float32; only the summation order differs


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "col.weight": rand(FFN, HIDDEN), "col.bias": rand(FFN),
        "row.weight": rand(HIDDEN, FFN), "row.bias": rand(HIDDEN),
        "gate.weight": rand(FFN, HIDDEN), "up.weight": rand(FFN, HIDDEN),
        "down.weight": rand(HIDDEN, FFN),
        "q.weight": rand(NUM_HEADS * HEAD_DIM, HIDDEN), "q.bias": rand(NUM_HEADS * HEAD_DIM),
        # six KV heads (split), three KV heads (split at 3, error at 2) and one (replicated)
        **{f"k{n}.weight": rand(n * HEAD_DIM, HIDDEN) for n in (1, 6)},
        **{f"v{n}.weight": rand(n * HEAD_DIM, HIDDEN) for n in (1, 6)},
        **{f"k{n}.bias": rand(n * HEAD_DIM) for n in (1, 6)},
        **{f"v{n}.bias": rand(n * HEAD_DIM) for n in (1, 6)},
        "embed.weight": rand(VOCAB, HIDDEN),
    }


def _build(tp, lazy: dict) -> dict[str, torch.nn.Module]:
    col = ColumnParallelLinear(HIDDEN, FFN, bias=True, tp=tp)
    col.weight.weight_loader(col.weight, lazy["col.weight"])
    col.bias.weight_loader(col.bias, lazy["col.bias"])
    row = RowParallelLinear(FFN, HIDDEN, bias=True, tp=tp)
    row.weight.weight_loader(row.weight, lazy["row.weight"])
    row.bias.weight_loader(row.bias, lazy["row.bias"])
    mlp = GatedMLP(HIDDEN, FFN, tp)
    mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, lazy["gate.weight"], 0)
    mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, lazy["up.weight"], 1)
    mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, lazy["down.weight"])
    layers = {"col": col, "row": row, "mlp": mlp}
    for num_kv in (1, 6):
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv, bias=True, tp=tp)
        for shard, name in (("q", "q"), ("k", f"k{num_kv}"), ("v", f"v{num_kv}")):
            qkv.weight.weight_loader(qkv.weight, lazy[f"{name}.weight"], shard)
            qkv.bias.weight_loader(qkv.bias, lazy[f"{name}.bias"], shard)
        layers[f"qkv{num_kv}"] = qkv
    embed = VocabParallelEmbedding(VOCAB, HIDDEN, tp)
    head = ParallelLMHead(VOCAB, HIDDEN, tp)
    for module in (embed, head):
        module.weight.weight_loader(module.weight, lazy["embed.weight"])
    layers.update(embed=embed, head=head)
    return layers


def _forward(layers: dict, tp, x: torch.Tensor, ffn_in: torch.Tensor, ids: torch.Tensor) -> dict:
    ffn_shard = ffn_in.chunk(tp.world_size, dim=-1)[tp.rank]  # a row layer's input is split
    out = {
        "col": layers["col"](x), "row": layers["row"](ffn_shard), "mlp": layers["mlp"](x),
        "embed": layers["embed"](ids), "logits": layers["head"].compute_logits(x),
    }
    for num_kv in (1, 6):
        qkv = layers[f"qkv{num_kv}"]
        q, k, v = qkv(x).split([qkv.num_heads * HEAD_DIM, qkv.num_kv_heads * HEAD_DIM,
                                qkv.num_kv_heads * HEAD_DIM], dim=-1)
        out[f"q{num_kv}"], out[f"k{num_kv}"], out[f"v{num_kv}"] = q, k, v
        out[f"kv_replicas{num_kv}"] = qkv.kv_replicas
    return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, HIDDEN, generator=g), torch.randn(5, FFN, generator=g),
            torch.tensor([0, 16, 17, 33, 49]))


def _sharded_run(groups, path: str) -> dict:
    counter = ReadCounter()
    lazy = dict(iterate_weights(path, progress=False, counter=counter))
    with torch.inference_mode():
        out = _forward(_build(groups.tp, lazy), groups.tp, *_inputs())
    out["bytes_read"] = counter.num_bytes
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-layers")
    weights = _weights()
    save_file(weights, folder / "model.safetensors")
    with torch.inference_mode():
        expected = _forward(_build(SINGLE_PROCESS, weights), SINGLE_PROCESS, *_inputs())
    total_bytes = sum(t.numel() * 4 for t in weights.values())
    return folder, expected, total_bytes


@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_layers_equal_the_unsharded_ones(checkpoint, tp):
    folder, expected, total_bytes = checkpoint
    ranks = run_ranks(_sharded_run, str(folder), tp=tp)
    # Row-parallel layers, embeddings and the gathered LM head give the full result on every
    # rank; column-parallel ones give each rank its slice of the output features.
    for out in ranks:
        for name in ("row", "mlp", "embed", "logits"):
            torch.testing.assert_close(out[name], expected[name], atol=ATOL, rtol=RTOL)
    for name in ("col", "q1", "q6", "k6", "v6"):
        torch.testing.assert_close(torch.cat([o[name] for o in ranks], dim=-1), expected[name],
                                   atol=ATOL, rtol=RTOL)
    # One KV head on tp ranks: every rank holds it whole.
    for out in ranks:
        assert out["kv_replicas1"] == tp
        torch.testing.assert_close(out["k1"], expected["k1"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out["v1"], expected["v1"], atol=ATOL, rtol=RTOL)
    # Each rank reads its share and never the whole checkpoint: split tensors by 1/tp, the
    # one-KV-head projections and the row layer's bias whole; the embedding (embedding and LM
    # head) and q (both QKV layers) twice.
    replicated = {"k1.weight", "v1.weight", "k1.bias", "v1.bias", "row.bias"}
    sizes = {name: t.numel() * 4 for name, t in _weights().items()}
    embed_share = 2 * -(-VOCAB // tp) * HIDDEN * 4
    split = sum(n for k, n in sizes.items() if k not in replicated | {"embed.weight"})
    split += sizes["q.weight"] + sizes["q.bias"]
    bound = split / tp + sum(sizes[k] for k in replicated) + embed_share
    assert bound < total_bytes
    assert [out["bytes_read"] <= bound for out in ranks] == [True] * tp, (
        [out["bytes_read"] for out in ranks], bound)
