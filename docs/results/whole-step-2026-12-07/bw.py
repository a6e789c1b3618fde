import time, torch, statistics
from gguf import GGMLQuantizationType as Q
from fleetlm.kernels import gguf_linear
lib = gguf_linear._library()
# a big random Q4_1 matrix: n rows x k cols
n, k = 49152*2, 576*2   # 98304 x 1152 -> blocks 36/row, 20 B -> 70.8 MB
row_bytes = gguf_linear.GGUFWeight.row_bytes_of(Q.Q4_1, k)
data = torch.randint(0, 255, (n, row_bytes), dtype=torch.uint8)
# set fp16 scales to small sane values: bytes 0..3 of each block
blk = data.view(n, k // 32, 20)
blk[:, :, 0:2] = torch.tensor([0x00, 0x3c], dtype=torch.uint8)  # 1.0 fp16
blk[:, :, 2:4] = 0
w = gguf_linear.GGUFWeight(data, Q.Q4_1, k).repacked()
x = torch.randn(1, k)
y = torch.empty(1, n)
def run(th):
    return lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, k, w.data.data_ptr(), n, w.kernel_type, y.data_ptr(), th)
big = torch.ones(64 << 20)
for th in (1, 2, 1, 2):
    ts = []
    for _ in range(9):
        t = time.perf_counter(); assert run(th) == 0; ts.append(time.perf_counter() - t)
    print(th, "threads", f"{w.data.numel() / min(ts) / 1e9:.1f} GB/s best, {w.data.numel()/statistics.median(ts)/1e9:.1f} median")
for th in (1, 2):
    torch.set_num_threads(th)
    ts = []
    for _ in range(9):
        t = time.perf_counter(); big.sum(); ts.append(time.perf_counter() - t)
    print("torch.sum", th, f"{big.numel()*4/min(ts)/1e9:.1f} GB/s")
from fleetlm.kernels import hugepages
hp = hugepages.empty(w.data.numel()).view(w.data.shape); hp.copy_(w.data)
print("hp bytes", hugepages.huge_page_bytes(hp))
def run2(th, data):
    return lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, k, data.data_ptr(), n, w.kernel_type, y.data_ptr(), th)
bigh = hugepages.empty(256 << 20).view(torch.float32).fill_(1)
for rep in range(2):
  for th in (1, 2):
    for name, data in (("plain", w.data), ("huge", hp)):
        ts = []
        for _ in range(9):
            t = time.perf_counter(); assert run2(th, data) == 0; ts.append(time.perf_counter() - t)
        print("product", name, th, f"{data.numel() / min(ts) / 1e9:.1f} GB/s")
    torch.set_num_threads(th)
    for name, b in (("plain", big), ("huge", bigh)):
        ts = []
        for _ in range(9):
            t = time.perf_counter(); b.sum(); ts.append(time.perf_counter() - t)
        print("sum", name, th, f"{b.numel()*4/min(ts)/1e9:.1f} GB/s")
    torch.set_num_threads(2)
