"""Options shared by several subcommands, and loading a model from them."""

from __future__ import annotations

import argparse
import sys

from rgemma.cli.numbers import positive_int, seed

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    # Validated by rgemma.quantize, so that a bad value is a one-line error like any other.
    parser.add_argument("--quantize", type=int, metavar="{8,4}",
                        help="quantize a float checkpoint's weights to int8 or int4 while loading")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="inputs per int4 group, a multiple of 64 (default 64)")


def quantize_options(args) -> dict:
    """load_model's quantization arguments from --quantize and --group-size."""
    if args.group_size is not None and args.quantize != 4:
        raise ValueError("--group-size applies to --quantize 4 only (int8 keeps one scale per row)")
    if args.quantize is None:
        return {}
    return {"quantize": args.quantize} | ({} if args.group_size is None else {"group_size": args.group_size})


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR",
                        help="a LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """What load_engine reads: the model, an adapter, the dtype, quantization and threads."""
    parser.add_argument("--model", help="checkpoint directory or file, or a Hugging Face hub id "
                        "(default: the model embedded in rgemma)")
    add_adapter_option(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute in this dtype (default: the checkpoint's)")
    add_quantize_options(parser)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")


def add_generation_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", type=float, default=0.95, help="nucleus: smallest set with this mass")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--seed", type=seed, help="make sampling reproducible")
    sampling.add_argument("--logprobs", type=int, default=0, help="report the top-n log-probabilities (--json)")


def load_engine(args, **engine_options):
    """An engine over the model and tokenizer of --model (a path, a hub id, or the embedded default)."""
    from rgemma.checkpoint import load_model
    from rgemma.engine import Engine
    from rgemma.hub import resolve_model
    from rgemma.tokenizer import Tokenizer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_model(path, dtype=torch_dtype(args.dtype), **quantize_options(args)).eval()
    if getattr(args, "adapter", None):
        from rgemma.lora import load_adapter

        load_adapter(model, args.adapter)
    tokenizer = Tokenizer.find(path)
    tokenizer.check_fits(model.config.vocab_size)
    return Engine(model, tokenizer, **engine_options)


def sampling_params(args):
    from rgemma.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, logprobs=args.logprobs,
    )


def print_stats(stats) -> None:
    print(
        f"[prompt {stats.prompt_tokens} tokens, {stats.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {stats.generated_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s | "
        f"first token {stats.first_token_seconds:.2f} s | state {stats.state_bytes:,} bytes]",
        file=sys.stderr,
    )
