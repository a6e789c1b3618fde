import sys, time, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
from collections import defaultdict
from fleetlm import SamplingParams
from fleetlm.executor import model_runner, scheduler as sched_mod, output_processor, sampling_metadata, input_batch
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.engine_core import EngineCore
from fleetlm.kernels import decode_stack, gguf_linear
llm = sp.load("gguf", 1, "int8")
sp.decode_steps(llm, 1, 8)
engine = llm.engine
T = defaultdict(float)
def wrap(owner, name, label):
    f = getattr(owner, name)
    def w(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: T[label] += time.perf_counter() - t
    setattr(owner, name, w)
runner = engine.core.executor.runner if hasattr(engine.core.executor, "runner") else None
wrap(LLMEngine, "step", "engine.step")
wrap(EngineCore, "step", "core.step")
wrap(type(engine.core.scheduler), "schedule", "schedule")
wrap(type(engine.core.scheduler), "update_from_output", "update_from_output")
wrap(type(engine.output_processor), "process_outputs", "process_outputs")
wrap(model_runner.ModelRunner, "_execute_model", "_execute_model")
wrap(model_runner.ModelRunner, "_update_states", "_update_states")
wrap(model_runner, "prepare_batch", "prepare_batch")
wrap(model_runner.ModelRunner, "_greedy_step", "_greedy_step")
wrap(decode_stack.DecodeStack, "run_model_argmax", "run_model_argmax")
wrap(model_runner, "_is_argmax_only", "_is_argmax_only")
wrap(model_runner.ModelRunner, "_start_grammar_bitmask", "_start_grammar_bitmask")
wrap(type(engine.core.executor), "execute_async", "execute_async")
wrap(model_runner.ModelRunner, "execute_model", "execute_model")
wrap(model_runner.ModelRunner, "_make_output", "_make_output")
wrap(decode_stack.DecodeStack, "run_model", "run_model")
wrap(type(runner.model), "forward", "model.forward")
sp.add_prompts(engine, 1, 4, SamplingParams(temperature=0, max_tokens=1100, ignore_eos=True))
for _ in range(20): engine.step()
T.clear()
N = 1000
t = time.perf_counter()
for _ in range(N): engine.step()
total = time.perf_counter() - t
print(f"loop per step {total/N*1e6:.0f} us")
for k, v in T.items(): print(f"{k:28s} {v/N*1e6:8.1f} us")
