"""`rgemma chat`: interactive multi-turn chat."""

from __future__ import annotations

import argparse

from rgemma.cli.options import add_generation_options, load_engine, print_stats, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_options(parser, max_tokens=512)
    parser.add_argument("--system", help="a system message, folded into the first user turn")


def run(args: argparse.Namespace) -> None:
    import sys

    from rgemma import chat
    from rgemma.hub import model_files, resolve_model

    sampling = sampling_params(args)
    engine = load_engine(args)
    protected = [*model_files(resolve_model(args.model)), engine.tokenizer.path]
    session = chat.Chat(engine, sampling, args.max_tokens, system=args.system, protected=protected)
    # Invalid UTF-8 on stdin becomes lone surrogates, which the tokenizer refuses for that one line,
    # instead of a decoding error that would end the conversation.
    sys.stdin.reconfigure(errors="surrogateescape")
    chat.run(session, report=print_stats)
