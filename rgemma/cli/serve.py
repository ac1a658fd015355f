"""`rgemma serve`: an OpenAI-compatible HTTP server (rgemma/server) with continuous batching."""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading

from rgemma.cli.numbers import positive_int
from rgemma.cli.options import add_model_options, load_engine

EXAMPLES = """\
examples:
  rgemma serve --port 8000          # the embedded model, served as "rgemma-small"

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "rgemma-small", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="rgemma-small", stream=True,
                                              messages=[{"role": "user", "content": "Hello"}]):
      print(chunk.choices[0].delta.content or "", end="")

GET /health says whether the model is ready; GET /metrics has Prometheus metrics.
"""
DEFAULT_NAME = "rgemma-small"
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_count(text: str) -> int:
    """'0', '512MiB', '2G', '1.5GB' -> bytes."""
    match = SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (say 0, 512MiB, 2G)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help=f"the name clients ask for (default: --model, or {DEFAULT_NAME})")
    parser.add_argument("--api-key", default=os.environ.get("RGEMMA_API_KEY"),
                        help="require Authorization: Bearer KEY on /v1 (default: $RGEMMA_API_KEY, else none)")
    parser.add_argument("--max-batch", type=positive_int, default=64, help="sequences decoded together")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="requests waiting for their first token; more get 503 with Retry-After")
    parser.add_argument("--cache-bytes", type=byte_count, default=2**30,
                        help="bound of the prefix state cache, e.g. 512MiB (default 1GiB; 0 turns it off)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=32768)
    parser.add_argument("--max-tokens", type=positive_int, default=4096,
                        help="the most tokens a choice may generate, and the default when a request names none")
    parser.add_argument("--max-body-bytes", type=byte_count, default=2**20)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> None:
    try:
        import uvicorn

        from rgemma.server.app import Settings, create_app
    except ImportError as error:
        raise ValueError(f"rgemma serve needs the server extra ({error.name} is missing): "
                         "pip install 'rgemma[server]'") from None
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    engine = load_engine(args, max_batch=args.max_batch)
    name = args.served_model_name or args.model or DEFAULT_NAME
    settings = Settings(model_name=name, api_key=args.api_key or None, max_batch=args.max_batch,
                        max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, cache_bytes=args.cache_bytes)
    app = create_app(engine, settings)

    worker = app.state.worker
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))

    def say_when_ready():
        worker.settled.wait()
        if worker.failure:  # the traceback is printed; stop serving, and say why below
            server.should_exit = True
            return
        print(f"rgemma: serving {name!r} at http://{args.host}:{args.port}/v1 "
              f"({engine.backend.describe()['decode']} decode), ready", file=sys.stderr, flush=True)

    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"rgemma: warning: listening on {args.host} with no API key: anyone who can reach this port can "
              "use the model (--api-key or RGEMMA_API_KEY)", file=sys.stderr)
    threading.Thread(target=say_when_ready, daemon=True).start()
    # On Ctrl-C or SIGTERM, streams still running get a few seconds to end, then are cut.
    server.run()
    if worker.failure:
        raise ValueError(worker.failure)
