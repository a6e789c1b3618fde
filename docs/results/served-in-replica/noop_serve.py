import os, sys, time, statistics, http.client, json
os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
os.environ["RAY_worker_niceness"] = "0"
import ray
from ray import serve
from fastapi import FastAPI
app = FastAPI()

@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Noop:
    @app.post("/v1/completions")
    async def c(self) -> dict:
        return {"ok": 1}

ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20)
serve.start(http_options={"host": "127.0.0.1", "port": 8011})
serve.run(Noop.bind(), name="noop", route_prefix="/")
conn = http.client.HTTPConnection("127.0.0.1", 8011)
ts = []
for i in range(60):
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", b"{}", {"Content-Type": "application/json"})
    r = conn.getresponse(); r.read()
    ts.append((time.perf_counter() - t) * 1e3)
ts = ts[10:]
print(f"noop serve POST: median {statistics.median(ts):.1f} ms min {min(ts):.1f} (grpc={os.environ['RAY_SERVE_PROXY_USE_GRPC']})")
serve.shutdown(); ray.shutdown()
