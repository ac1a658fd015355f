"""`rgemma chat`: interactive multi-turn chat."""

from __future__ import annotations

import argparse

from rgemma.cli.options import add_generation_options, load_engine, print_stats, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_options(parser, max_tokens=512)
    parser.add_argument("--system", help="a system message, folded into the first user turn")


def run(args: argparse.Namespace) -> None:
    from rgemma import chat

    sampling = sampling_params(args)
    session = chat.Chat(load_engine(args), sampling, args.max_tokens, system=args.system)
    chat.run(session, report=print_stats)
