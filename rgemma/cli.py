"""The `rgemma` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _load(source: str, dtype_name: str | None):
    """A preset name gives an uninitialised model on the meta device; anything else is a checkpoint path."""
    import torch

    from rgemma import Config, Griffin
    from rgemma.config import PRESETS

    if source in PRESETS:
        return Griffin(Config.preset(source), dtype=_dtype(dtype_name) or torch.bfloat16, device="meta")
    from rgemma.checkpoint import load_model

    return load_model(source, dtype=_dtype(dtype_name))


def cmd_info(args) -> None:
    from rgemma.state import State

    model = _load(args.model, args.dtype)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state = State.zeros(config, 1, dtype=model.dtype, device="meta")
    info = {
        "source": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "state_bytes_per_sequence": state.nbytes,
        "config": {**{k: getattr(config, k) for k in config.__dataclass_fields__}, "block_types": list(config.block_types)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    pattern = "".join("R" if b == "recurrent" else "A" for b in config.block_types)
    print(f"model        {args.model}")
    print(f"parameters   {parameters:,} ({weight_bytes / 2**30:.2f} GiB in {info['dtype']})")
    print(f"state        {state.nbytes:,} bytes per sequence, whatever its length")
    print(f"layers       {config.num_layers}: {pattern} (R recurrent, A local attention)")
    print(f"width        {config.width}, lru {config.lru_width}, mlp {config.mlp_width} x2, "
          f"heads {config.num_heads} x {config.head_dim} (1 kv head)")
    print(f"window       {config.attention_window} earlier tokens + itself")
    print(f"vocabulary   {config.vocab_size}, logits soft-cap {config.logits_soft_cap or 'none'}, "
          f"embedding scale {config.embedding_scale}")


def cmd_convert(args) -> None:
    from rgemma.checkpoint import convert

    convert(args.src, args.dst, dtype=_dtype(args.dtype), max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.dst}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgemma", description="Run and convert RecurrentGemma / Griffin models.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="config, parameter count, dtype and state size of a model")
    info.add_argument("model", help="preset name (2b, 9b, griffin-7b, hawk-7b, tiny) or checkpoint path")
    info.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to report (presets) or load in")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser(
        "convert", help="convert an official .pt, Flax/Orbax or HF checkpoint to the Hugging Face layout")
    convert.add_argument("src")
    convert.add_argument("dst", help="output directory (must not exist)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights to this dtype")
    convert.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in GiB")
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        # Bad input: one line that names the problem, no traceback.
        print(f"rgemma: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rgemma: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
