"""`rgemma bench-serve`: load on the server from 1, 4, 16, 64 concurrent streaming clients.

Each client sends its requests one after another: a prompt of random token
ids (so no two share a prefix and the cache never helps), greedy, a fixed
number of tokens (`ignore_eos`). Reported per concurrency: requests/s,
generated tokens/s over the wall time and its ratio to one client's; decode
tokens/s while every stream decodes (the tokens that arrive between the
last stream's first token and the first stream's last, over that time;
prompts are read one request at a time, so that a request's tokens never
depend on what else is queued, and this leaves their reading out; nan
where no such time exists, as with several requests per client) and its
ratio to one client's; and the p50/p99 time to first token and inter-token
latency (gaps between the stream's chunks). The server runs in this process (real HTTP on loopback)
unless --url names one already running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from rgemma.cli.numbers import positive_int
from rgemma.cli.options import DTYPES, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    source = parser.add_argument_group("server (one of; default: the embedded model)")
    source.add_argument("--model", help="checkpoint directory or file")
    source.add_argument("--preset", help="random weights of a preset (2b, 9b, ...), with the embedded tokenizer "
                        "padded to its vocabulary")
    source.add_argument("--url", help="a running rgemma serve, e.g. http://127.0.0.1:8000")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="for --preset (default bfloat16)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of the in-process server")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrencies to measure, comma-separated")
    parser.add_argument("--requests-per-client", type=positive_int, default=2)
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--max-tokens", type=positive_int, default=32, help="tokens generated per request")
    parser.add_argument("--json", help="write the measurements to this file")


def run(args) -> None:
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        clients = []
    if not clients or min(clients) < 1:
        raise ValueError(f"--clients: expected positive integers separated by commas, got {args.clients!r}")
    if sum(x is not None for x in (args.model, args.preset, args.url)) > 1:
        raise ValueError("give at most one of --model, --preset and --url")
    with serving(args) as (url, name, vocab_size, describe):
        print(f"server: {describe}", file=sys.stderr)
        # Warm the path end to end, with a prompt of its own (seed 0: Random(-n) repeats Random(n), and the cache
        # would hand the one-client run its prompt).
        asyncio.run(load(url, name, vocab_size, 1, 1, args, seed=0))
        rows = []
        for count in clients:
            rows.append(asyncio.run(load(url, name, vocab_size, count, args.requests_per_client, args, seed=count)))
            print_row(rows[-1], rows[0])
    if args.json:
        Path(args.json).write_text(json.dumps({"server": describe, "rows": rows}, indent=2))


@contextlib.contextmanager
def serving(args):
    """(base url, model name, vocabulary size, a description) of the server to load."""
    import httpx

    if args.url:
        name = httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
        yield args.url.rstrip("/"), name, 256, f"{args.url} ({name}; prompts from token ids below 256)"
        return
    import torch
    import uvicorn

    from rgemma.engine import Engine
    from rgemma.server.app import Settings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, name = load_model(args, Path(scratch))
        engine = Engine(model, tokenizer, max_batch=max(64, *map(int, args.clients.split(","))))
        app = create_app(engine, Settings(model_name=name, max_queue=4096))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        worker = app.state.worker
        while not server.started or not worker.settled.is_set():
            time.sleep(0.05)
        if worker.failure:
            server.should_exit = True
            thread.join()
            raise ValueError(worker.failure)
        describe = (f"{name}, {sum(p.numel() for p in model.parameters()) / 1e6:,.0f} M parameters, "
                    f"{engine.backend.describe()}, {torch.get_num_threads()} threads")
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", name, model.config.vocab_size, describe
        finally:
            server.should_exit = True
            thread.join()


def load_model(args, scratch: Path):
    from rgemma.checkpoint import load_model as load
    from rgemma.hub import DEFAULT_MODEL, resolve_model
    from rgemma.tokenizer import Tokenizer

    if args.preset is None:
        path = resolve_model(args.model)
        return load(path).eval(), Tokenizer.find(path), args.model or "rgemma-small"
    from rgemma.bench.engines import random_model
    from rgemma.config import Config

    config = Config.preset(args.preset)
    model = random_model(config, torch_dtype(args.dtype), seed=0)
    return model, Tokenizer(padded_tokenizer(DEFAULT_MODEL / "tokenizer.model", config.vocab_size, scratch)), args.preset


def padded_tokenizer(source: Path, vocab_size: int, directory: Path) -> Path:
    """A copy of a SentencePiece model with unused pieces up to `vocab_size`, so every id decodes."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(source.read_bytes())
    for i in range(len(proto.pieces), vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    path = directory / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path


async def load(url: str, name: str, vocab_size: int, clients: int, requests: int, args, seed: int) -> dict:
    """`clients` streams at once, each sending `requests` requests in turn; prompts differ across seeds."""
    import httpx

    rng = random.Random(seed)
    results = []

    async def client(http: httpx.AsyncClient):
        for _ in range(requests):
            prompt = [2] + [rng.randrange(10, vocab_size) for _ in range(args.prompt_tokens - 1)]
            body = {"model": name, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            started = time.perf_counter()
            arrivals, tokens = [], 0
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise ValueError(f"the server answered {response.status_code}: {await response.aread()!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"]:
                        arrivals.append(time.perf_counter())
            results.append((started, arrivals, tokens))

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - began
    first = [arrivals[0] - started for started, arrivals, _ in results]
    gaps = [b - a for _, arrivals, _ in results for a, b in zip(arrivals, arrivals[1:])]
    generated = sum(tokens for *_, tokens in results)
    return {"clients": clients, "requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": generated / wall, "decode_tokens_per_s": all_decoding_rate([a for _, a, _ in results]),
            "ttft_p50": percentile(first, 50), "ttft_p99": percentile(first, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}


def all_decoding_rate(streams: list[list[float]]) -> float:
    """Chunks per second that arrive while every stream decodes: from the last stream's first chunk to the first
    stream's last; NaN where there is no such time."""
    streams = [s for s in streams if s]
    if not streams:
        return float("nan")
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    if end <= start:
        return float("nan")
    return sum(start < t <= end for s in streams for t in s) / (end - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def print_row(row: dict, first: dict) -> None:
    print(f"{row['clients']:>3} clients: {row['requests']:>4} requests in {row['seconds']:6.1f} s, "
          f"{row['requests_per_s']:6.2f} req/s, {row['tokens_per_s']:7.1f} tok/s "
          f"({row['tokens_per_s'] / first['tokens_per_s']:4.1f}x {first['clients']} client), "
          f"decode {row['decode_tokens_per_s']:7.1f} tok/s "
          f"({row['decode_tokens_per_s'] / first['decode_tokens_per_s']:4.1f}x), "
          f"TTFT p50 {row['ttft_p50'] * 1e3:7.0f} ms p99 {row['ttft_p99'] * 1e3:7.0f} ms, "
          f"ITL p50 {row['itl_p50'] * 1e3:6.0f} ms p99 {row['itl_p99'] * 1e3:6.0f} ms", flush=True)
