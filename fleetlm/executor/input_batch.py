"""Turn one SchedulerOutput into the model's input tensors (numpy on the host, one copy each).

Region map of a step's tokens (see attention.py): requests with one scheduled token first
(decodes), then the rest (prefill chunks), each request's tokens contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fleetlm.executor.attention import AttentionMetadata
from fleetlm.executor.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """What a worker keeps for a request between steps."""

    req_id: str
    token_ids: list[int]  # prompt + outputs sampled so far (the worker appends its own samples)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]
    num_computed_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class PreparedBatch:
    req_ids: list[str]  # in batch order
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    sampling_req_ids: list[str]  # requests whose prompt is complete after this step
    # Rows whose logits are sampled: each sampling request's last token, preceded by its
    # draft tokens' rows when it verifies drafts (len(drafts) + 1 rows, in position order).
    # Increasing: as many indices as rows means every row (`ModelRunner._sample` relies on it).
    logits_indices: torch.Tensor
    prompt_logprob_rows: dict[str, tuple[int, int, int]]  # req -> (first row, count, first pos)
    sampling_drafts: list[list[int]]  # per sampling request: the drafts it verifies


def order_for_batch(num_scheduled_tokens: dict[str, int]) -> list[str]:
    decodes = [r for r, n in num_scheduled_tokens.items() if n == 1]
    prefills = [r for r, n in num_scheduled_tokens.items() if n != 1]
    return decodes + prefills


def _block_table(rows: list[list[int]]) -> np.ndarray:
    table = np.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=np.int32)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table


class DecodeBuffers:
    """Host tensors that a step of single tokens writes its inputs into, step after step: no
    tensor is made per step. For one caller that runs one step at a time (a model runner):
    a step's tensors are overwritten by the next step's.

    Each torch call that made a tensor cost 10-25 us in a decode step, where the weights just
    streamed through the caches have evicted torch's own code and data (eight such calls were
    0.17 ms of a 6.9 ms one-sequence step on the 2-vCPU EPYC; docs/benchmarks.md). Here a step
    writes numpy views of the buffers and takes tensor views cached by their shape."""

    MAX_VIEWS = 512  # cached shapes; past this the cache starts again

    def __init__(self, max_rows: int, max_blocks: int):
        self.max_rows, self.max_blocks = max_rows, max_blocks
        self._ints = torch.zeros(4 * max_rows, dtype=torch.int64)  # ids, positions, slots, rows
        self._seq_lens = torch.zeros(max_rows, dtype=torch.int32)
        self._tables = torch.zeros(max_rows * max_blocks, dtype=torch.int32)
        self.ints, self.seq_lens = self._ints.numpy(), self._seq_lens.numpy()
        self.tables = self._tables.numpy()
        int32 = {"dtype": torch.int32}
        # A decode step's prefill part: empty, never written.
        self.no_prefill = (torch.zeros(1, **int32), torch.empty(0, **int32),
                           torch.empty((0, 0), **int32))
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}

    def fits(self, rows: int, width: int) -> bool:
        return rows <= self.max_rows and width <= self.max_blocks

    def views(self, rows: int, num_sampled: int, width: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, logits rows, seq_lens, block table [rows, width]): the first
        3 * rows + num_sampled ints, the first rows seq_lens and rows * width table entries."""
        key = (rows, num_sampled, width)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= self.MAX_VIEWS:
                self._views.clear()
            views = (*self._ints[:3 * rows + num_sampled].split([rows, rows, rows, num_sampled]),
                     self._seq_lens[:rows], self._tables[:rows * width].view(rows, width))
            self._views[key] = views
        return views


def prepare_batch(states: dict[str, CachedRequestState], num_scheduled_tokens: dict[str, int],
                  block_size: int, device: torch.device,
                  spec_tokens: dict[str, list[int]] | None = None,
                  buffers: DecodeBuffers | None = None) -> PreparedBatch:
    """`spec_tokens`: each verifying request's drafts, its last scheduled tokens. `buffers`:
    where a CPU step of single tokens writes its tensors (the caller's, reused each step)."""
    if not spec_tokens and all(n == 1 for n in num_scheduled_tokens.values()):
        return _prepare_decodes(states, list(num_scheduled_tokens), block_size, device,
                                buffers if device.type == "cpu" else None)
    return _prepare_any(states, num_scheduled_tokens, block_size, device, spec_tokens or {})


def _prepare_decodes(states: dict[str, CachedRequestState], req_ids: list[str],
                     block_size: int, device: torch.device,
                     buffers: DecodeBuffers | None = None) -> PreparedBatch:
    """`_prepare_any`'s tensors for a step of one token per request and no drafts, built from
    plain lists: no numpy arrays per request, and the four int64 inputs as views of one tensor
    (0.06-0.07 ms against 0.13-0.17 for one request, 0.11-0.23 against 0.50-0.57 for 32;
    docs/results/prepare-batch-2026-12-07/), or of `buffers` where given and large enough."""
    input_ids, positions, slots, seq_lens, tables = [], [], [], [], []
    sampling_req_ids, logits_rows = [], []
    prompt_rows: dict[str, tuple[int, int, int]] = {}
    for row, req_id in enumerate(req_ids):
        state = states[req_id]
        pos = state.num_computed_tokens
        input_ids.append(state.token_ids[pos])
        positions.append(pos)
        slots.append(state.block_ids[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(pos + 1)
        tables.append(state.block_ids)
        if pos + 1 == len(state.token_ids):  # otherwise a one-token chunk of a longer prompt
            sampling_req_ids.append(req_id)
            logits_rows.append(row)
        if state.sampling_params.prompt_logprobs is not None and pos < state.num_prompt_tokens - 1:
            prompt_rows[req_id] = (row, 1, pos)

    m = len(req_ids)
    width = max(map(len, tables), default=0)
    if buffers is not None and buffers.fits(m, width):
        ids_t, positions_t, slots_t, logits_t, seq_lens_t, tables_t = buffers.views(
            m, len(logits_rows), width)
        buffers.ints[:3 * m + len(logits_rows)] = input_ids + positions + slots + logits_rows
        buffers.seq_lens[:m] = seq_lens
        flat = buffers.tables
        for row, blocks in enumerate(tables):  # zero-padded to the widest, as _block_table
            start = row * width
            flat[start:start + len(blocks)] = blocks
            flat[start + len(blocks):start + width] = 0
        no_prefill = buffers.no_prefill
    else:  # one tensor and one split into views (each torch call costs several us here)
        ids_t, positions_t, slots_t, logits_t = torch.tensor(
            input_ids + positions + slots + logits_rows, dtype=torch.int64, device=device,
        ).split([m, m, m, len(logits_rows)])
        int32 = {"dtype": torch.int32, "device": device}
        tables_t = torch.from_numpy(_block_table(tables)).to(device)
        seq_lens_t = torch.tensor(seq_lens, **int32)
        no_prefill = (torch.zeros(1, **int32), torch.empty(0, **int32),
                      torch.empty((0, 0), **int32))
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        num_decode_tokens=m,
        decode_block_tables=tables_t,
        decode_seq_lens=seq_lens_t,
        num_prefill_tokens=0,
        prefill_cu_seqlens_q=no_prefill[0],
        prefill_seq_lens=no_prefill[1],
        prefill_block_tables=no_prefill[2],
        is_prefill_without_context=True,
    )
    return PreparedBatch(
        req_ids=req_ids,
        input_ids=ids_t,
        positions=positions_t,
        attn_metadata=meta,
        sampling_req_ids=sampling_req_ids,
        logits_indices=logits_t,
        prompt_logprob_rows=prompt_rows,
        sampling_drafts=[[] for _ in sampling_req_ids],
    )


def _prepare_any(states: dict[str, CachedRequestState], num_scheduled_tokens: dict[str, int],
                 block_size: int, device: torch.device,
                 spec_tokens: dict[str, list[int]]) -> PreparedBatch:
    req_ids = order_for_batch(num_scheduled_tokens)
    num_decodes = sum(1 for r in req_ids if num_scheduled_tokens[r] == 1)
    input_ids, positions, slots, seq_lens = [], [], [], []
    sampling_req_ids, logits_rows, sampling_drafts = [], [], []
    prompt_rows: dict[str, tuple[int, int, int]] = {}
    num_rows = 0
    for req_id in req_ids:
        state, n = states[req_id], num_scheduled_tokens[req_id]
        drafts = spec_tokens.get(req_id, [])
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        known_end = end - len(drafts)
        pos = np.arange(start, end)
        blocks = np.asarray(state.block_ids, dtype=np.int64)
        input_ids.append(np.asarray(state.token_ids[start:known_end] + drafts, dtype=np.int64))
        positions.append(pos)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(end)
        if known_end == len(state.token_ids):
            sampling_req_ids.append(req_id)
            sampling_drafts.append(drafts)
            last = num_rows + n - 1
            logits_rows.extend(range(last - len(drafts), last + 1))
        if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
            count = min(end, state.num_prompt_tokens - 1) - start
            prompt_rows[req_id] = (num_rows, count, start)
        num_rows += n

    def tensor(parts, dtype=torch.int64):
        return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)

    tables = [states[r].block_ids for r in req_ids]
    q_lens = [num_scheduled_tokens[r] for r in req_ids[num_decodes:]]
    meta = AttentionMetadata(
        slot_mapping=tensor(slots),
        num_decode_tokens=num_decodes,
        decode_block_tables=torch.from_numpy(_block_table(tables[:num_decodes])).to(device),
        decode_seq_lens=torch.tensor(seq_lens[:num_decodes], dtype=torch.int32, device=device),
        num_prefill_tokens=sum(q_lens),
        prefill_cu_seqlens_q=torch.tensor(np.cumsum([0] + q_lens), dtype=torch.int32,
                                          device=device),
        prefill_seq_lens=torch.tensor(seq_lens[num_decodes:], dtype=torch.int32, device=device),
        prefill_block_tables=torch.from_numpy(_block_table(tables[num_decodes:])).to(device),
        is_prefill_without_context=all(
            states[r].num_computed_tokens == 0 for r in req_ids[num_decodes:]),
    )
    return PreparedBatch(
        req_ids=req_ids,
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        attn_metadata=meta,
        sampling_req_ids=sampling_req_ids,
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=device),
        prompt_logprob_rows=prompt_rows,
        sampling_drafts=sampling_drafts,
    )
