"""Serving over loopback: `lmforge serve` with 16 concurrent streaming clients vs the same 16 requests
one after another, and (optionally) the same load against llama-cpp-python's server.

    python benchmarks/bench_serve.py [--model runs/demo] [--threads 2] [--max-tokens 128]
    python benchmarks/bench_serve.py --llamacpp model-f32.gguf      # + llama-cpp-python's server
    python benchmarks/bench_serve.py --soak [--soak-requests 500]     # reliability + memory

What each side does (default load):
- lmforge: a real `lmforge serve MODEL` subprocess (continuous batching engine, `--threads` torch
  threads); 16 completions requests (prompts: the first words of 16 GCIDE dictionary entries from
  ../shared/corpus, else the bundled sample), `max_tokens` 128, temperature 0.8, top_k 50, a seed per
  request, `ignore_eos` (so every request generates max_tokens), `stream: true`. "sequential": one request at a time, each waiting for the previous one's
  `[DONE]`; "concurrent": all 16 at once. Same requests, same server process.
- llama.cpp (`--llamacpp GGUF`): `python -m llama_cpp.server --model GGUF --n_threads T` (its fastest
  documented path for an OpenAI server on CPU; `--interrupt_requests False`, else each new request
  cuts the stream in progress short), the same 16 text prompts and sampling fields (end
  tokens banned by `logit_bias` -100, as it has no `ignore_eos`), the same client. Its server runs one request at a time (requests wait on a lock), so its concurrent
  and sequential rows should match.
The timer covers the HTTP requests only: from the first request sent to the last `[DONE]` (server
start-up, model loading and one warm-up request per server are left out). Tokens: `usage` of the
final chunk where the server sends it (lmforge), else one per streamed chunk (llama.cpp streams
one token per chunk). TTFT: request sent -> first chunk with text; per-token latency: (last chunk
- first chunk) / (tokens - 1) per request. Outputs: with sampling on, lmforge's sequential and
concurrent outputs are compared per request (same seed: equal unless batched float rounding
changed a draw; the number of equal ones is printed); llama.cpp's are not compared (other RNG).

`--soak`: `--soak-requests` (500) requests from 16 client workers: mixed prompt lengths and
max_tokens (1..128), half streamed, n=2 on every 8th, ~10% of all requests (a fifth of the streamed ones) disconnect after a
few chunks. Expected: zero failures (any non-200 or broken stream counts), the server's queue and
running batch empty at the end, RSS of the server process at start (after warm-up) vs end.

Figures are taken on a shared 2-core machine under load: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load, result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpus" / "dictionary" / "gcide.jsonl.gz"
SAMPLE = REPO / "src" / "lmforge" / "sample" / "dictionary" / "gcide-sample.jsonl.gz"


def prompts(n: int, words: int = 12, skip: int = 0) -> list[str]:
    path = SHARED if SHARED.exists() else SAMPLE
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            text = json.loads(line)["text"].split()
            if len(text) >= words:
                out.append(" ".join(text[:words]))
            if len(out) == n:
                break
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_lmforge(model: str, threads: int, extra=()) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMFORGE_PROGRESS": "0", "LMFORGE_API_KEY": ""}
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", model, "--port", "0", "--log-level", "warning",
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if " at http://" not in line:
        raise SystemExit(f"lmforge serve did not start: {line}{p.stderr.read()}")
    url = line.split(" at ")[1].split()[0]
    wait_ready(url + "/health", p)
    return p, url


def start_llamacpp(gguf: str, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
                          str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
                          "--interrupt_requests", "False"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/models", p)
    return p, url


def wait_ready(url: str, p: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            raise SystemExit(f"server exited: {p.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} not ready after {timeout} s")


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


async def one(client, url: str, body: dict, disconnect_after: int | None = None) -> dict:
    """One streamed completion: text, tokens, TTFT, per-token latency; `disconnect_after` chunks: leave."""
    t0 = time.perf_counter()
    first = last = None
    chunks, text, usage, finish = 0, [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            j = json.loads(line[6:])
            if "error" in j:
                return {"error": j["error"]}
            if j.get("usage"):
                usage = j["usage"]
            for c in j.get("choices", []):
                if c.get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(c["text"])
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
            if disconnect_after is not None and chunks >= disconnect_after:
                return {"disconnected": True}
        if not done:
            return {"error": "stream ended without [DONE]"}
    tokens = usage["completion_tokens"] if usage else chunks
    return {"text": "".join(text), "tokens": tokens, "ttft": (first or time.perf_counter()) - t0,
            "per_token": ((last - first) / (tokens - 1)) if first and tokens > 1 else None, "finish": finish}


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_load(url: str, bodies: list[dict], concurrent: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await one(client, url, {**bodies[0], "max_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        if concurrent:
            outs = await asyncio.gather(*(one(client, url, b) for b in bodies))
        else:
            outs = [await one(client, url, b) for b in bodies]
        wall = time.perf_counter() - t0
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    toks = sum(o["tokens"] for o in outs)
    return {"wall_s": round(wall, 3), "tokens": toks, "tok_s": round(toks / wall, 1),
            "ttft_p50_ms": round(1000 * pct([o["ttft"] for o in outs], 50), 1),
            "ttft_p99_ms": round(1000 * pct([o["ttft"] for o in outs], 99), 1),
            "per_token_p50_ms": round(1000 * pct([o["per_token"] for o in outs], 50), 2),
            "per_token_p99_ms": round(1000 * pct([o["per_token"] for o in outs], 99), 2),
            "texts": [o["text"] for o in outs]}


def show(label: str, r: dict) -> None:
    print(f"{label:28s} {r['tokens']:6d} tok in {r['wall_s']:7.2f} s = {r['tok_s']:7.1f} tok/s | TTFT p50 "
          f"{r['ttft_p50_ms']:7.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms | per token p50 {r['per_token_p50_ms']:6.2f} ms "
          f"p99 {r['per_token_p99_ms']:6.2f} ms | load {load()}", flush=True)


def bench(args) -> None:
    bodies = [{"model": None, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0.8, "top_k": 50,
               "seed": i, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
              for i, p in enumerate(prompts(args.clients))]
    print(f"lmforge serve {args.model}: {args.clients} requests x max_tokens {args.max_tokens}, torch threads "
          f"{args.threads}, load {load()}", flush=True)
    p, url = start_lmforge(args.model, args.threads)
    try:
        for b in bodies:
            b.pop("model")
        seq = asyncio.run(run_load(url, bodies, concurrent=False))
        show("lmforge sequential", seq)
        con = asyncio.run(run_load(url, bodies, concurrent=True))
        show(f"lmforge {args.clients} concurrent", con)
    finally:
        stop(p)
    same = sum(a == b for a, b in zip(seq["texts"], con["texts"]))
    ratio = con["tok_s"] / seq["tok_s"]
    print(f"concurrent / sequential throughput: {ratio:.2f}x (goal >= 4x); outputs equal in {same}/{len(bodies)} "
          f"requests (same seeds)", flush=True)
    extra = {"lmforge_sequential": {k: v for k, v in seq.items() if k != "texts"},
             "lmforge_concurrent": {k: v for k, v in con.items() if k != "texts"}, "equal_outputs": same}
    if args.llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp side skipped: llama_cpp (llama-cpp-python[server]) is not installed", flush=True)
        else:
            from lmforge.infer.engine import end_token_ids
            from lmforge.model.io import resolve_model
            from lmforge.tokenizer import Tokenizer

            # llama-cpp-python has no ignore_eos: the end tokens get a -100 logit bias instead
            ends = end_token_ids(Tokenizer.from_file(resolve_model(args.model).tokenizer))
            lbodies = [{**{k: v for k, v in b.items() if k not in ("ignore_eos", "stream_options")},
                        "logit_bias": {str(t): -100 for t in ends}} for b in bodies]
            ctx = args.llamacpp_ctx or json.loads((resolve_model(args.model).path / "config.json").read_text())["max_seq_len"]
            lp, lurl = start_llamacpp(args.llamacpp, args.threads, ctx=ctx)
            try:
                lseq = asyncio.run(run_load(lurl, lbodies, concurrent=False))
                show("llama.cpp sequential", lseq)
                lcon = asyncio.run(run_load(lurl, lbodies, concurrent=True))
                show(f"llama.cpp {args.clients} concurrent", lcon)
            finally:
                stop(lp)
            peer = con["tok_s"] / lcon["tok_s"]
            print(f"lmforge / llama.cpp, {args.clients} concurrent streams: {peer:.2f}x (goal >= 1.0x)", flush=True)
            extra["llamacpp_concurrent"] = {k: v for k, v in lcon.items() if k != "texts"}
            extra["llamacpp_sequential"] = {k: v for k, v in lseq.items() if k != "texts"}
            extra["vs_llamacpp"] = round(peer, 3)
    result("serve", ratio, 4.0, f"tokens/s, {args.clients} concurrent streams vs the same requests one after another",
           **extra)


async def soak(url: str, pid: int, n: int, workers: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    texts = prompts(64, words=30)
    jobs = []
    for i in range(n):
        words = texts[i % len(texts)].split()
        prompt = " ".join(words[: rng.randint(1, len(words))])
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 128), "temperature": rng.choice([0, 0.7, 1.0]),
                "seed": i, "n": 2 if i % 8 == 0 else 1}
        stream = i % 2 == 0
        disconnect = rng.randint(1, 4) if stream and rng.random() < 0.2 else None  # ~10% of all requests
        jobs.append((body, stream, disconnect))
    failures, done, disconnected = [], 0, 0
    q: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        q.put_nowait(j)

    async with httpx.AsyncClient(timeout=600) as client:
        await client.post(url + "/v1/completions", json={"prompt": "warm", "max_tokens": 8})
        rss0 = rss_kb(pid)

        async def worker():
            nonlocal done, disconnected
            while not q.empty():
                body, stream, disc = q.get_nowait()
                try:
                    if stream:
                        r = await one(client, url, {**body, "stream": True}, disconnect_after=disc)
                        if "error" in r:
                            failures.append(r["error"])
                        elif r.get("disconnected"):
                            disconnected += 1
                        else:
                            done += 1
                    else:
                        r = await client.post(url + "/v1/completions", json=body)
                        if r.status_code != 200 or len(r.json()["choices"]) != body["n"]:
                            failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        else:
                            done += 1
                except Exception as e:  # a broken connection is a failure
                    failures.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        metrics = (await client.get(url + "/metrics")).text
    gauges = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines()
              if l.startswith(("lmforge_queue_depth", "lmforge_running_requests", "lmforge_kv_blocks_used"))}
    return {"requests": n, "completed": done, "disconnected": disconnected, "failures": len(failures),
            "failure_examples": failures[:3], "wall_s": round(wall, 1), "rss_start_mb": round(rss0 / 1024, 1),
            "rss_end_mb": round(rss_kb(pid) / 1024, 1), "after": gauges}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "demo"), help="what `lmforge serve` serves")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads on each side")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--llamacpp", metavar="GGUF", help="also run the load against llama-cpp-python's server on GGUF")
    ap.add_argument("--llamacpp-ctx", type=int, default=0, help="llama.cpp n_ctx (default: the model's context)")
    ap.add_argument("--soak", action="store_true", help="the 500-request reliability / memory run instead")
    ap.add_argument("--soak-requests", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model}: not found (run `lmforge run` first, or pass --model)")
    if not args.soak:
        return bench(args)
    p, url = start_lmforge(args.model, args.threads)
    try:
        r = asyncio.run(soak(url, p.pid, args.soak_requests, args.clients, args.seed))
    finally:
        stop(p)
    print(json.dumps(r, indent=1), flush=True)
    print(f"soak: {r['requests']} requests, {r['failures']} failures, {r['disconnected']} client disconnects, "
          f"RSS {r['rss_start_mb']} -> {r['rss_end_mb']} MB, after: {r['after']}, load {load()}", flush=True)
    result("serve_soak", 1.0 if r["failures"] == 0 else 0.0, 1.0, "1 = zero failures in the soak run", **r)


if __name__ == "__main__":
    main()
