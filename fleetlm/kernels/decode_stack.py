"""A decode step through a stack of Llama decoder layers in one native call
(csrc/decode_stack.c through ctypes), for `quantization: gguf` on CPUs.

At one row a small model's decode step is mostly the Python around its kernels: the layer
loop, module calls, views and each kernel's entry checks, about ten calls a layer. Where a
stack qualifies, `DecodeStack.run` replaces the whole loop by one call that runs the same
kernels (`fused_ops`, `gguf_linear`'s integer dot products, `cpu_attention`) in the same order
with the same arguments, so its hidden states equal the loop's bit for bit. The loop stays the
reference and runs everything else: prefill rows, other weights and KV-cache dtypes, tensor
parallelism, `FLEETLM_NATIVE_DECODE=0`. Below 8 rows, on more than one thread, the call runs
its layers as one OpenMP team (csrc/team.h): each thread takes its share of every product
and of attention and the threads meet at a barrier of their own, instead of a region per
kernel (2.5 us each on the 2-vCPU EPYC, five a layer); the results are the same bits.

Where the stack is a whole model (one pipeline stage) with a GGUF embedding,
`DecodeStack.run_model` also takes what the model's Python did around `run`: the embedding
lookup, the rotary tables' rows and the final norm, again with the same kernels. After the
stack has streamed the weights through the caches that Python runs cold: the one call made a
one-sequence step 9% shorter on the 2-vCPU EPYC (docs/benchmarks.md).

A stack qualifies when each layer is plain (no biases, no q/k norm, a gated MLP) with all four
matrices held whole in one of the integer-dot types (Q4_0 / Q4_1 / Q8_0) and fp32 norm
weights; a call qualifies when every row is a decode row, there are fewer than
`gguf_linear.INT8_GEMM_MIN_ROWS` of them, activations are fp32, the KV caches fp32 or int8
(`kv_cache_dtype: int8`) and the int8 products are on (`FLEETLM_GGUF_INT8_DOT`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fleetlm.kernels import cpu_attention, cpu_build, gguf_linear, kv_quant

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "decode_stack.c"
LINKED = (CSRC / "fused_ops.c", CSRC / "gguf_matmul.c", CSRC / "paged_attention.c")
ENV = "FLEETLM_NATIVE_DECODE"
KV_DTYPES = (torch.float32, torch.int8)  # the caches the stack writes and reads
STAGES = {1: "qkv product", 2: "KV-cache write", 3: "attention", 4: "o product",
          5: "gate/up product", 6: "down product", 7: "embedding", 8: "rotary",
          9: "LM head"}

_ptr, _int64 = ctypes.c_void_p, ctypes.c_int64


class LayerWeights(ctypes.Structure):
    """One layer's pointers, as csrc/decode_stack.c reads them."""

    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _ptr), ("o", _ptr),
                ("gate_up", _ptr), ("down", _ptr), ("qkv_type", ctypes.c_int32),
                ("o_type", ctypes.c_int32), ("gate_up_type", ctypes.c_int32),
                ("down_type", ctypes.c_int32), ("k_cache", _ptr), ("v_cache", _ptr)]


class StackShape(ctypes.Structure):
    _fields_ = [("hidden", _int64), ("num_heads", _int64), ("num_kv_heads", _int64),
                ("head_dim", _int64), ("intermediate", _int64), ("num_blocks", _int64),
                ("block_size", _int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("kv_dtype", ctypes.c_int32)]


class ModelEnds(ctypes.Structure):
    """What a whole model adds around its stack, as csrc/decode_stack.c reads it."""

    _fields_ = [("embedding", _ptr), ("embedding_type", ctypes.c_int32), ("vocab", _int64),
                ("max_position", _int64), ("cos_table", _ptr), ("sin_table", _ptr),
                ("final_norm", _ptr), ("final_eps", ctypes.c_float)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE, linked=LINKED)
    if library is not None:
        library.fleet_decode_stack.argtypes = [
            ctypes.POINTER(LayerWeights), _int64, ctypes.POINTER(StackShape), _int64, _ptr,
            _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _ptr, _int64, ctypes.c_int,
            ctypes.POINTER(_int64)]
        library.fleet_decode_stack.restype = ctypes.c_int
        library.fleet_decode_model.argtypes = [
            ctypes.POINTER(LayerWeights), _int64, ctypes.POINTER(StackShape),
            ctypes.POINTER(ModelEnds), _int64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
            _int64, ctypes.c_int, ctypes.POINTER(_int64)]
        library.fleet_decode_model.restype = ctypes.c_int
        library.fleet_decode_model_argmax.argtypes = [
            ctypes.POINTER(LayerWeights), _int64, ctypes.POINTER(StackShape),
            ctypes.POINTER(ModelEnds), _ptr, ctypes.c_int, _int64, _int64, _int64, _ptr, _ptr,
            _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int64, ctypes.c_int,
            ctypes.POINTER(_int64), _ptr]
        library.fleet_decode_model_argmax.restype = ctypes.c_int
    return library


def enabled() -> bool:
    """Whether decode steps may take the native stack ($FLEETLM_NATIVE_DECODE, default on)."""
    return os.environ.get(ENV, "1") != "0"


@dataclass(frozen=True)
class EndsSpec:
    """What a whole model (first and last pipeline stage at once) adds around its layers:
    the token embedding (GGUF rows, or tiles where it is also the packed LM head), the
    rotary tables [max_position, head_dim / 2] fp32, the final norm's fp32 weight and eps."""

    embedding: gguf_linear.GGUFWeight
    cos: torch.Tensor
    sin: torch.Tensor
    final_norm: torch.Tensor
    final_eps: float
    # The LM head, where the model's logits are this GGUF matrix's product alone (its first
    # `vocab` rows): `run_model_argmax` then takes greedy tokens in the same call.
    head: gguf_linear.GGUFWeight | None = None
    vocab: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """What the stack needs of one layer: its norms' weights and its four matrices."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: gguf_linear.GGUFWeight
    o: gguf_linear.GGUFWeight
    gate_up: gguf_linear.GGUFWeight
    down: gguf_linear.GGUFWeight


class DecodeStack:
    """The layers of one model (or pipeline stage), ready for `run`. Build with `make`, which
    says None where the layers do not qualify."""

    def __init__(self, library: ctypes.CDLL, specs: list[LayerSpec], num_heads: int,
                 num_kv_heads: int, head_dim: int, eps: float,
                 ends: EndsSpec | None = None) -> None:
        self._library = library
        self._specs = specs  # keeps the weights the pointers below point into alive
        self.ends = ends  # held likewise; None: `run_model` is not available
        first = specs[0]
        self.hidden = first.qkv.shape[1]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.intermediate = first.down.shape[1]
        self.eps = eps
        self.scale = head_dim ** -0.5
        self._layers = (LayerWeights * len(specs))()
        for layer, spec in zip(self._layers, specs):
            layer.input_norm = spec.input_norm.data_ptr()
            layer.post_norm = spec.post_norm.data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                weight = getattr(spec, name)
                setattr(layer, name, weight.data.data_ptr())
                setattr(layer, f"{name}_type", weight.kernel_type)
        self._ends = None if ends is None else ModelEnds(
            ends.embedding.data.data_ptr(), ends.embedding.kernel_type, ends.embedding.shape[0],
            ends.cos.shape[0], ends.cos.data_ptr(), ends.sin.data_ptr(),
            ends.final_norm.data_ptr(), ends.final_eps)
        self.has_head = ends is not None and ends.head is not None  # `run_model_argmax`
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}  # rows -> its scratch
        self._caches: tuple = ()  # the dtype, data pointers and shapes of the caches bound
        self._bound_list: list | None = None  # the list they came in (held: its id stays)
        self._shape = StackShape()

    @classmethod
    def make(cls, specs: list[LayerSpec], num_heads: int, num_kv_heads: int, head_dim: int,
             eps: float, ends: EndsSpec | None = None) -> DecodeStack | None:
        """The stack, or None where a layer does not qualify or the library does not load.
        `ends` that do not qualify (an embedding of another type, tables not fp32
        [*, head_dim / 2]) are dropped: the model's Python runs them around `run`."""
        if not specs or head_dim % 16:
            return None
        hidden, q_width = specs[0].qkv.shape[1], num_heads * head_dim
        intermediate = specs[0].down.shape[1]
        shapes = {"qkv": (q_width + 2 * num_kv_heads * head_dim, hidden),
                  "o": (hidden, q_width), "gate_up": (2 * intermediate, hidden),
                  "down": (hidden, intermediate)}
        for spec in specs:
            for norm in (spec.input_norm, spec.post_norm):
                if norm.dtype != torch.float32 or not norm.is_contiguous() or (
                        norm.shape != (hidden,)):
                    return None
            for name, shape in shapes.items():
                weight = getattr(spec, name)
                if weight.qtype not in gguf_linear.INT8_DOT_TYPES or weight.shape != shape \
                        or not weight.data.is_contiguous():
                    return None
        if ends is not None and not _ends_qualify(ends, hidden, head_dim):
            ends = None
        if ends is not None and ends.head is not None and not _head_qualifies(ends, hidden):
            ends = replace(ends, head=None)
        library = _library()
        return None if library is None else cls(library, specs, num_heads, num_kv_heads,
                                                 head_dim, eps, ends)

    def accepts(self, rows: int, dtype: torch.dtype, kv_caches) -> bool:
        """Whether `run` (or `run_model`) can take `rows` decode rows of activations in
        `dtype` (the layout of the rows is the caller's check)."""
        k_cache = kv_caches[0][0]
        return (dtype == torch.float32 and rows < gguf_linear.INT8_GEMM_MIN_ROWS
                and gguf_linear._INT8_DOT and k_cache.dtype in KV_DTYPES
                and k_cache.device.type == "cpu")

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches,
                  slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor) -> torch.Tensor:
        """The final norm's output [m, hidden] for decode tokens `input_ids` [m] at
        `positions` [m] (int64): embedding, every layer and the final norm in one call, where
        the stack was made with `ends`. The other arguments are `run`'s."""
        self._bind_caches(kv_caches)
        m = input_ids.shape[0]
        hidden, residual, normed = torch.empty(3, m, self.hidden).unbind()
        input_ids, positions = _as(input_ids, torch.int64), _as(positions, torch.int64)
        slot_mapping, seq_lens, block_tables = _decode_meta(slot_mapping, seq_lens, block_tables)
        failed = _int64(0)
        status = self._library.fleet_decode_model(
            self._layers, len(self._layers), ctypes.byref(self._shape), ctypes.byref(self._ends),
            m, input_ids.data_ptr(), positions.data_ptr(), hidden.data_ptr(),
            residual.data_ptr(), normed.data_ptr(), slot_mapping.data_ptr(),
            seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            torch.get_num_threads(), ctypes.byref(failed))
        if status:
            self._raise(status, failed.value)
        return normed

    def run_model_argmax(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches,
                         slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor) -> list[int]:
        """Each row's greedy token: `run_model`, the LM head and the argmax of its logits
        (the first index of the largest, as `fused_ops.argmax`) in one call, where the stack
        was made with `ends` holding the head (`has_head`). The same products and argmax as
        the model's Python and the sampler, so the same tokens."""
        self._bind_caches(kv_caches)
        m, ends = input_ids.shape[0], self.ends
        buffers = self._buffers.get(m)
        if buffers is None:  # scratch reused by every step of m rows: nothing made per step
            buffers = (*torch.empty(3, m, self.hidden).unbind(),
                       torch.empty(m, ends.head.shape[0]), torch.empty(m, dtype=torch.int64))
            self._buffers[m] = buffers
        hidden, residual, normed, logits, tokens = buffers
        input_ids, positions = _as(input_ids, torch.int64), _as(positions, torch.int64)
        slot_mapping, seq_lens, block_tables = _decode_meta(slot_mapping, seq_lens, block_tables)
        failed = _int64(0)
        status = self._library.fleet_decode_model_argmax(
            self._layers, len(self._layers), ctypes.byref(self._shape), ctypes.byref(self._ends),
            ends.head.data.data_ptr(), ends.head.kernel_type, ends.head.shape[0], ends.vocab, m,
            input_ids.data_ptr(), positions.data_ptr(),
            hidden.data_ptr(), residual.data_ptr(), normed.data_ptr(), logits.data_ptr(),
            slot_mapping.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], torch.get_num_threads(), ctypes.byref(failed),
            tokens.data_ptr())
        if status:
            self._raise(status, failed.value)
        return tokens.tolist()

    def run(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor, kv_caches, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after the stack, for decode rows `hidden` [m, hidden] (one token
        of each of m sequences; `residual` None where hidden is it, as in a model's first
        layer). cos / sin [m, 1, head_dim / 2] fp32 of the rows' positions, `kv_caches` one
        (k, v) cache per layer (fp32, or int8 rows with their scales: `kv_quant`),
        slot_mapping [m] int64, seq_lens [m] and block_tables [m, max_blocks] int32 (the decode
        part of `AttentionMetadata`)."""
        self._bind_caches(kv_caches)
        hidden = hidden.contiguous()
        out_residual = torch.empty_like(hidden) if residual is None else residual.contiguous()
        slot_mapping, seq_lens, block_tables = _decode_meta(slot_mapping, seq_lens, block_tables)
        cos, sin = cos.contiguous(), sin.contiguous()  # held: the call reads them
        failed = _int64(0)
        status = self._library.fleet_decode_stack(
            self._layers, len(self._layers), ctypes.byref(self._shape), hidden.shape[0],
            hidden.data_ptr(), out_residual.data_ptr(), residual is not None,
            cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
            seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            torch.get_num_threads(), ctypes.byref(failed))
        if status:
            self._raise(status, failed.value)
        return hidden, out_residual

    def _bind_caches(self, kv_caches) -> None:
        """Point the layers at these caches (once per set of caches). The runner passes the
        same list every step and allocates a new one for new caches, so the list bound last
        is taken as it is (its 60 tensors' pointers, shapes and strides took 0.19 ms a step,
        3% of a one-sequence decode step); any other list is compared tensor by tensor."""
        if kv_caches is self._bound_list:
            return
        key = (kv_caches[0][0].dtype, *((cache.data_ptr(), cache.shape, cache.stride())
                                        for pair in kv_caches for cache in pair))
        if key == self._caches:
            self._bound_list = kv_caches
            return
        if len(kv_caches) != len(self._layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self._layers)} layers")
        first = kv_caches[0][0]
        row = kv_quant.row_width(self.head_dim, first.dtype)
        for cache in (cache for pair in kv_caches for cache in pair):
            if not cache.is_contiguous() or cache.shape != first.shape \
                    or cache.dtype != first.dtype or first.shape[2:] != (self.num_kv_heads, row):
                raise ValueError(f"KV cache of shape {tuple(cache.shape)} does not fit "
                                 f"{self.num_kv_heads} kv heads of {self.head_dim}")
        for layer, (k_cache, v_cache) in zip(self._layers, kv_caches):
            layer.k_cache, layer.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        num_blocks, block_size = first.shape[:2]
        self._shape = StackShape(self.hidden, self.num_heads, self.num_kv_heads, self.head_dim,
                                 self.intermediate, num_blocks, block_size, self.eps,
                                 self.scale, cpu_attention.KV_DTYPE_CODES[first.dtype])
        self._caches = key
        self._bound_list = kv_caches

    @staticmethod
    def _raise(status: int, layer: int) -> None:
        stage, code = divmod(status, 16)
        if stage == 0:
            raise RuntimeError("decode stack: out of memory")
        if stage == 3:
            from fleetlm.kernels.cpu_attention import STATUS_MESSAGES as messages
        elif stage == 2:
            messages = {1: "a slot is outside the cache"}
        elif stage == 9:
            raise ValueError(f"decode step, {STAGES[stage]}: "
                             f"{gguf_linear.STATUS_MESSAGES.get(code, code)}")
        elif stage in (7, 8):  # before any layer
            what = "a token id is past the vocabulary" if stage == 7 else \
                "a position is past the rotary tables"
            raise IndexError(f"decode step, {STAGES[stage]}: {what}")
        else:
            messages = gguf_linear.STATUS_MESSAGES
        raise ValueError(f"decode stack, layer {layer}, {STAGES.get(stage, stage)}: "
                         f"{messages.get(code, code)}")


def _decode_meta(slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode part of `AttentionMetadata` as the C calls read it: int64 slots, int32
    lengths and block tables, contiguous (already so from `prepare_batch`: no copies)."""
    return (_as(slot_mapping, torch.int64), _as(seq_lens, torch.int32),
            _as(block_tables, torch.int32))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, contiguous: itself where it already is (a decode step's inputs are),
    without the two torch calls that would say so (each 5-10 us right after the weights'
    stream)."""
    return x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()


def _head_qualifies(ends: EndsSpec, hidden: int) -> bool:
    """An LM head the C call multiplies as `gguf_linear.matmul` would at decode rows."""
    head = ends.head
    return (head.qtype in gguf_linear.INT8_DOT_TYPES and head.shape[1] == hidden
            and 0 < ends.vocab <= head.shape[0] and head.data.is_contiguous()
            and not (head.packed and not gguf_linear._library().has_wide_tiles))


def _ends_qualify(ends: EndsSpec, hidden: int, head_dim: int) -> bool:
    embedding = ends.embedding
    tables_ok = all(t.dtype == torch.float32 and t.is_contiguous() and t.dim() == 2
                    and t.shape == ends.cos.shape and t.shape[1] == head_dim // 2
                    for t in (ends.cos, ends.sin))
    return (tables_ok and embedding.shape[1] == hidden
            and embedding.data.is_contiguous() and ends.final_norm.dtype == torch.float32
            and ends.final_norm.is_contiguous() and ends.final_norm.shape == (hidden,))
