"""One engine, decode runs alternated between 1 and 2 OpenMP threads (torch.set_num_threads):
the stack's synchronisation against its bandwidth."""
import sys, statistics, torch; sys.path.insert(0, "benchmarks")
import step_parts as sp
llm = sp.load("gguf", 1, "int8")
bw = sp.ReadBandwidth()
sp.decode_steps(llm, 1, 8)
res = {1: [], 2: []}; bws = {1: [], 2: []}
for r in range(int(sys.argv[1])):
    for th in ((1, 2) if r % 2 == 0 else (2, 1)):
        torch.set_num_threads(th)
        bws[th].append(max(bw.read(3).values()))
        res[th].append(sp.median(sp.decode_steps(llm, 1, 32)))
torch.set_num_threads(2)
nbytes = sp.bytes_per_step(llm)
for th in (1, 2):
    step = statistics.median(res[th]); b = statistics.median(bws[th])
    print(f"{th} thread(s): step {step*1e3:.2f} ms, read bandwidth {b:.1f} GB/s, floor {nbytes/b/1e6:.2f} ms, ratio {step*1e3/(nbytes/b/1e6):.2f}")
