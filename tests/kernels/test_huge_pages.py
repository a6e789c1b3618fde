"""GGUF weights gathered onto 2 MiB pages after loading (`fleetlm.kernels.huge_pages`)."""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.kernels import gguf_linear, huge_pages
from fleetlm.kernels.gguf_linear import QuantizedMatrix

from test_gguf_linear import random_weight


def _quantized_parameter(matrix: QuantizedMatrix) -> nn.Parameter:
    parameter = nn.Parameter(torch.empty(0), requires_grad=False)
    parameter.quantized = matrix
    return parameter


def _module() -> tuple[nn.Module, list[QuantizedMatrix]]:
    """Three whole matrices (one of them Q4_1, packed where the wide tiles run) and a
    parameter tied to the first, as an LM head to its embedding."""
    module, matrices = nn.Module(), []
    for index, (name, rows, cols) in enumerate((("Q8_0", 64, 96), ("Q4_1", 48, 128),
                                                ("Q4_0", 40, 64))):
        matrix = QuantizedMatrix((rows, cols))
        matrix.put(0, random_weight(name, rows, cols, seed=index))
        matrices.append(matrix)
        module.register_parameter(f"w{index}", _quantized_parameter(matrix))
    module.register_parameter("tied", _quantized_parameter(matrices[0]))
    return module, matrices


def test_weights_move_into_one_huge_page_arena_with_the_same_products(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "1")
    module, matrices = _module()
    x = torch.randn(3, 128)
    before = [(m.whole.data.clone(), m.whole.packed, gguf_linear.matmul(x[:, :m.shape[1]],
                                                                       m.whole))
              for m in matrices]
    moved = huge_pages.gather_gguf_weights(module)
    if not huge_pages.available():  # THP `never` on this system: nothing moves
        assert moved == 0
        return
    starts = [m.whole.data.data_ptr() for m in matrices]
    assert moved == sum(-(-m.whole.nbytes // 64) * 64 for m in matrices)  # the tied one once
    assert starts[0] % huge_pages.HUGE_PAGE == 0 and starts == sorted(starts)
    assert all(start % 64 == 0 for start in starts)
    assert huge_pages.huge_page_bytes(matrices[0].whole.data) > 0
    for matrix, (data, packed, product) in zip(matrices, before, strict=True):
        assert torch.equal(matrix.whole.data, data) and matrix.whole.packed == packed
        assert torch.equal(gguf_linear.matmul(x[:, :matrix.shape[1]], matrix.whole), product)


def test_weights_stay_where_they_are_when_turned_off(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    module, matrices = _module()
    pointers = [m.whole.data.data_ptr() for m in matrices]
    assert huge_pages.gather_gguf_weights(module) == 0
    assert [m.whole.data.data_ptr() for m in matrices] == pointers
