import ctypes, sys; sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
import numpy as np
from fleetlm.kernels import decode_stack
csrc = Path("/tmp/w/timed/csrc")
decode_stack.SOURCE = csrc / "decode_stack.c"
decode_stack.LINKED = tuple(csrc / p.name for p in decode_stack.LINKED)
import step_parts as sp
llm = sp.load("gguf", 1, "int8")
lib = decode_stack._library()
out = (ctypes.c_double * 64)()
sp.decode_steps(llm, 1, 8)
lib.fleet_times_read(out)
steps = 0
for _ in range(10):
    steps += len(sp.decode_steps(llm, 1, 128))
lib.fleet_times_read(out)
a = np.array(out).reshape(4, 8, 2) / steps * 1e6
names = ["", "qkv", "rot+kv write", "attention", "o", "gate_up", "down"]
for st in range(1, 7):
    print(f"{names[st]:14s} work t0 {a[0, st, 0]:7.1f} us  wait t0 {a[0, st, 1]:6.1f}  | work t1 {a[1, st, 0]:7.1f}  wait t1 {a[1, st, 1]:6.1f}")
print("totals: t0 work %.0f wait %.0f | t1 work %.0f wait %.0f us/step" % (a[0, :, 0].sum(), a[0, :, 1].sum(), a[1, :, 0].sum(), a[1, :, 1].sum()))
