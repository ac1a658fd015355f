"""`rgemma eval`: loss, perplexity and bits per byte on a text or JSONL file, or multiple-choice accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rgemma.cli.numbers import positive_int
from rgemma.cli.options import DTYPES, add_adapter_option, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or file, or a Hugging Face hub id "
                        "(default: the model embedded in rgemma)")
    add_adapter_option(parser)
    parser.add_argument("--data", required=True,
                        help='plain text (one document), JSONL of {"text"} or {"messages"} documents, or JSONL '
                        'of {"context", "choices", "answer"} questions (scored as multiple choice)')
    parser.add_argument("--chunk", type=int, help="tokens read per forward; the state carries across chunks")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute in this dtype (default: the checkpoint's)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _is_multiple_choice(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    with open(path, "rb") as lines:
        first = next((line for line in lines if line.strip()), b"")
    try:
        record = json.loads(first.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # reported with its line number by the reader
    return isinstance(record, dict) and "choices" in record


def run(args: argparse.Namespace) -> None:
    import torch

    from rgemma.checkpoint import load_model
    from rgemma.hub import resolve_model
    from rgemma.tokenizer import Tokenizer
    from rgemma.train.eval import evaluate_file, score_choices

    if args.chunk is not None and args.chunk < 1:
        raise ValueError(f"--chunk must be at least 1, got {args.chunk}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_file():
        raise ValueError(f"{data}: no such file")
    path = resolve_model(args.model)
    model = load_model(path, dtype=torch_dtype(args.dtype))
    if args.adapter:
        from rgemma.lora import load_adapter

        load_adapter(model, args.adapter)
    tokenizer = Tokenizer.find(path)
    if _is_multiple_choice(data):
        result = score_choices(model, tokenizer, data).to_dict()
        text = (f"{result['questions']} questions: accuracy {result['accuracy']:.4f}, "
                f"per byte {result['accuracy_per_byte']:.4f}")
    else:
        result = evaluate_file(model, tokenizer, data, args.chunk).to_dict()
        text = (f"{result['tokens']} tokens: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, "
                f"bits per byte {result['bits_per_byte']:.4f}")
    print(json.dumps(result) if args.json else text)
