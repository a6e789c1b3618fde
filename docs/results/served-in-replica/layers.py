"""Split a minimal request's time by layer in one process, without Serve: AsyncEngine,
LLMServer.completions, OpenAIIngress over a LocalHandle through ASGI (medians of 25, two
passes). PROF=1: a cProfile of 50 requests through the ingress instead. Run from the root."""
import asyncio, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from fleetlm.cluster.config import load_config, to_engine_config
from fleetlm.executor.sampling_params import SamplingParams

IDS = [504, 3575, 282, 4649]
N = 25
cfg = load_config("configs/bench-cpu-gguf.yaml")
ecfg = to_engine_config(cfg)

def med(xs): return f"{statistics.median(xs):.1f} ms (min {min(xs):.1f})"

async def main():
    from fleetlm.executor.async_engine import AsyncEngine
    from fleetlm.cluster.server import LLMServer
    from fleetlm.cluster.openai_protocol import CompletionRequest
    from fleetlm.cluster.ingress import OpenAIIngress, build_fastapi
    from fleetlm.cluster.local_handle import LocalHandle
    from fleetlm.cluster.serve_router import routing_table
    from fleetlm.cluster.config import MigrationSection
    from fleetlm.cluster.app import _prompt_hasher
    import json as _json
    server = LLMServer(ecfg, "smollm2-135m-instruct")
    eng = server.engine
    params = SamplingParams(max_tokens=1, temperature=0)
    async def via_engine(i):
        async for _ in eng.generate(IDS, params, f"r{i}"):
            pass
    async def via_server(i):
        req = CompletionRequest(prompt=IDS, max_tokens=1, temperature=0)
        async for _ in server.completions(req, f"s{i}"):
            pass
    table = routing_table("a", "LLMServer", cfg.router)
    handle = LocalHandle(server, "a", "LLMServer", "me", table)
    ingress = OpenAIIngress("smollm2-135m-instruct", handle, cfg.router, (), MigrationSection(max_migrations=0), hasher=_prompt_hasher(cfg, None))
    app = build_fastapi(ingress)
    body = _json.dumps({"prompt": IDS, "max_tokens": 1, "temperature": 0}).encode()
    async def via_asgi(i):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        sent = []
        done = asyncio.Event()
        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}
        status = []
        async def send(msg):
            if msg["type"] == "http.response.start": status.append(msg["status"])
            if msg["type"] == "http.response.body" and not msg.get("more_body"): done.set()
        await app(scope, receive, send)
        assert status == [200], status
    import cProfile, pstats, os
    if os.environ.get("PROF"):
        for i in range(3): await via_asgi(f"w{i}")
        pr = cProfile.Profile(); pr.enable()
        for i in range(50): await via_asgi(i)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        await server.shutdown(); return
    for name, fn in [("AsyncEngine.generate", via_engine), ("LLMServer.completions", via_server), ("ingress ASGI (LocalHandle)", via_asgi)] * 2:
        for i in range(3): await fn(f"w{name}{i}")
        ts = []
        for i in range(N):
            t = time.perf_counter(); await fn(f"{name}{i}{time.time()}"); ts.append((time.perf_counter() - t) * 1e3)
        print(f"{name:30s} {med(ts)}", flush=True)
    await server.shutdown()

asyncio.run(main())
