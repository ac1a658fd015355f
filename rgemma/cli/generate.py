"""`rgemma generate`: continue a prompt, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys

from rgemma.cli.options import add_generation_options, load_engine, print_stats, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt, or - to read it from stdin")
    parser.add_argument("--prompt-file", help="read the prompt from this file")
    add_generation_options(parser, max_tokens=256)
    parser.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format of -it models")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("--state", help="continue from a state file saved with --save-state")
    parser.add_argument("--save-state", help="save the state at the end (with --max-tokens 0: after the prompt)")
    parser.add_argument("--force", action="store_true", help="let --save-state replace an existing file")


def _prompt_text(args) -> str:
    if args.prompt_file:
        if args.prompt is not None:
            raise ValueError("give the prompt once: a PROMPT argument or --prompt-file, not both")
        try:
            return open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{args.prompt_file}: cannot read the prompt: {error}") from error
    if args.prompt is None:
        raise ValueError("give a PROMPT, - to read it from stdin, or --prompt-file FILE")
    if args.prompt != "-":
        return args.prompt
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"stdin: the prompt is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _progress_bar(total: int, device):
    """A progress bar on stderr for prompts longer than one prefill chunk."""
    from tqdm import tqdm

    from rgemma.model import prefill_chunk

    if total <= prefill_chunk(device):
        return None
    bar = tqdm(total=total, unit="tok", desc="reading prompt", file=sys.stderr, leave=False)
    return bar.update


def run(args: argparse.Namespace) -> None:
    from rgemma.context import Context
    from rgemma.engine import Request
    from rgemma.generate import Generation, prefill
    from rgemma.hub import model_files, resolve_model
    from rgemma.state import check_target
    from rgemma.tokenizer import chat_prompt

    text = _prompt_text(args)
    sampling = sampling_params(args)
    engine = load_engine(args)
    model, tokenizer = engine.model, engine.tokenizer
    # The model's own files are never written over; an existing file only with --force. Checked before the
    # work of generating, and again (by save_state) when writing.
    protected = [*model_files(resolve_model(args.model)), tokenizer.path]
    if args.save_state:
        check_target(args.save_state, args.force, protected)
    context = Context.load(args.state, model) if args.state else None
    if context is not None and context.batch_size != 1:
        raise ValueError(f"{args.state}: holds {context.batch_size} rows; generate continues one")
    if args.chat:
        if context is not None:
            raise ValueError("--chat formats a new conversation; continue a saved chat with `rgemma chat` and /load")
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": text}])
    else:
        prompt = tokenizer.encode(text, bos=context is None)
    if args.max_tokens == 0:  # only read the prompt, e.g. to --save-state it
        context = prefill(model, [prompt], context, progress=_progress_bar(len(prompt), model.device))
        if args.save_state:
            context.save(args.save_state, model, overwrite=args.force, protected=protected)
        return
    request = Request(prompt, sampling, args.max_tokens, stop=args.stop or (), ignore_eos=args.ignore_eos,
                      keep_context=bool(args.save_state))
    generation = Generation(engine, [request], context, prefill_progress=_progress_bar(len(prompt), model.device))
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
        generation.contexts[0].save(args.save_state, model, overwrite=args.force, protected=protected)
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
        print(json.dumps(result, allow_nan=False))  # NaN is not JSON: an error rather than a broken document
    else:
        sys.stdout.write("\n")
    print_stats(stats)
