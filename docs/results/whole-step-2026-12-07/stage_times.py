"""Per-stage time inside the native decode stack (instrumented copy of decode_stack.c)."""
import ctypes, statistics, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import step_parts as sp
from kernel_ab import load_version
from fleetlm.kernels import decode_stack, gguf_linear, cpu_attention
from fleetlm.parallel.layers import weight_bytes

csrc = Path(sys.argv[1])
steps_wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 600
import os, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
llm = sp.load("gguf", 1, "int8")
model = llm.engine.executor.runner.model
gguf, stack, attention = load_version(csrc)
gguf_linear._library = lambda: gguf
decode_stack._library = lambda: stack
cpu_attention._library = lambda: attention
model._native_stack, model._is_stack_made = model._make_decode_stack(), True
model._native_stack._library = stack
buf = (ctypes.c_double * 12)()
sp.decode_steps(llm, 1, 16)
stack.fleet_stack_timings(buf, 1)
steps = []
while len(steps) < steps_wanted:
    steps += sp.decode_steps(llm, 1, int(sys.argv[4]) if len(sys.argv) > 4 else 128, input_len=int(sys.argv[3]) if len(sys.argv) > 3 else 4)
stack.fleet_stack_timings(buf, 1)
n = buf[11]
names = ["norm1", "qkv", "rotary", "kv write", "attention", "o", "norm2", "gate_up", "silu", "down"]
layer0 = model.layers["0"] if isinstance(model.layers, dict) or hasattr(model.layers, "keys") else model.layers[0]
bw = max(sp.ReadBandwidth().read().values())
per = {}
for name, p in layer0.named_parameters():
    per[name] = weight_bytes(p)
print("layer params bytes:", {k: v for k, v in per.items()})
print(f"median step {statistics.median(steps)*1e3:.2f} ms over {len(steps)}; stack calls {n:.0f}; bw {bw:.1f} GB/s")
tot = 0
for i, name in enumerate(names):
    us = buf[i] / n
    tot += us
    print(f"  {name:10s} {us:8.1f} us/step  {us/30:6.2f} us/layer")
print(f"  total      {tot:8.1f} us/step")
mb = {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"}
for stage, key in mb.items():
    b = sum(v for k, v in per.items() if key in k) * 30
    us = buf[names.index(stage)] / n
    print(f"  {stage:8s} {b/1e6:6.2f} MB/step  {b/us/1e3:6.1f} GB/s  ({b/us/1e3/bw*100:.0f}% of bw)")
llm.shutdown()
