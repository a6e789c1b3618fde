"""`prepare_batch` for a step of decodes alone: 1, 8 and 32 requests of about 300 tokens, the
best of 11 timings of 300 calls each. Run from the repository root, at two commits:

    .venv/bin/python docs/results/prepare-batch-2026-12-07/prepare_batch.py
"""
import random
import timeit

import torch

from fleetlm.executor.input_batch import CachedRequestState, prepare_batch
from fleetlm.executor.sampling_params import SamplingParams

BLOCK_SIZE = 16


def decodes(rng: random.Random, num_requests: int, context: int = 300):
    states, scheduled = {}, {}
    for i in range(num_requests):
        num_computed = context + i
        tokens = [rng.randrange(49152) for _ in range(num_computed + 1)]
        blocks = rng.sample(range(4096), num_computed // BLOCK_SIZE + 2)
        states[f"r{i}"] = CachedRequestState(f"r{i}", tokens, 256, SamplingParams(), 2, blocks,
                                             num_computed)
        scheduled[f"r{i}"] = 1
    return states, scheduled


rng = random.Random(0)
for num_requests in (1, 8, 32):
    states, scheduled = decodes(rng, num_requests)
    call = lambda: prepare_batch(states, scheduled, BLOCK_SIZE, torch.device("cpu"))  # noqa: E731
    call()
    best = min(timeit.repeat(call, number=300, repeat=11)) / 300
    print(f"{num_requests:2d} requests: {best * 1e6:.1f} us")
