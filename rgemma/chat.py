"""Interactive multi-turn chat that keeps the conversation as the fixed-size state.

Each turn feeds only its own tokens: the history lives in the Context, never
re-read. Lines starting with "/" are commands: /save FILE (a new file),
/save! FILE (replacing one), /load FILE, /reset, /quit. A command that fails
(a damaged file, a full disk) says why, and the conversation goes on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TextIO

from safetensors import SafetensorError

from rgemma.context import Context
from rgemma.engine import Engine, Request
from rgemma.generate import Generation
from rgemma.sampling import SamplingParams
from rgemma.state import check_target
from rgemma.tokenizer import TokenizerError, chat_prompt, next_user_turn

HELP = "commands: /save FILE, /save! FILE (replace it), /load FILE, /reset, /quit"


class Chat:
    def __init__(self, engine: Engine, sampling: SamplingParams, max_tokens: int, system: str | None = None,
                 protected: Iterable[str | os.PathLike] = ()):
        """`protected`: files /save never writes over (the model's own)."""
        self.engine = engine
        self.protected = list(protected)
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.system = system
        self.context: Context | None = None

    def turn_tokens(self, message: str) -> list[int]:
        if self.context is None:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": message}
            ]
            return chat_prompt(self.tokenizer, messages)
        tokens = next_user_turn(self.tokenizer, message)
        if self.context.tokens[0][-1] != self.tokenizer.end_of_turn_id:
            # The last reply ran out of tokens: close the model's turn first.
            tokens = [self.tokenizer.end_of_turn_id] + tokens
        return tokens

    def reply(self, message: str, out: TextIO) -> Generation:
        """Stream the model's answer to `out`; the context moves on past it."""
        request = Request(self.turn_tokens(message), self.sampling, self.max_tokens, keep_context=True)
        generation = Generation(self.engine, [request], self.context)
        for events in generation:
            out.write(events[0].text)
            out.flush()
        out.write("\n")
        self.context = generation.contexts[0]
        return generation

    def command(self, line: str, err: TextIO) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.context = None
            print("(conversation reset)", file=err)
        elif name in ("/save", "/save!", "/load") and not argument:
            print(f"{name} needs a file name", file=err)
        elif name in ("/save", "/save!"):
            if self.context is None:
                print("nothing to save yet", file=err)
            else:
                overwrite = name == "/save!"
                try:
                    check_target(argument, overwrite, self.protected, force="/save! FILE")
                    self.context.save(argument, self.model, overwrite=overwrite, protected=self.protected)
                    print(f"(saved to {argument})", file=err)
                except (ValueError, OSError, SafetensorError) as error:
                    print(f"rgemma: error: {error}", file=err)
        elif name == "/load":
            try:
                context = Context.load(argument, self.model)
                if context.batch_size != 1:  # else the next turn fails, and ends the chat
                    raise ValueError(f"{argument}: holds {context.batch_size} rows; a chat continues one")
                self.context = context
                print(f"(loaded {argument}: {len(self.context.tokens[0])} tokens)", file=err)
            except (ValueError, OSError) as error:  # the conversation so far is kept
                print(f"rgemma: error: {error}", file=err)
        else:
            print(HELP, file=err)
        return True


def run(chat: Chat, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
        report=None) -> None:
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with the model; {HELP}", file=stderr)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line, stderr):
                break
            continue
        try:
            generation = chat.reply(line, stdout)
        except TokenizerError as error:  # raised before anything is read: the conversation is as it was
            print(f"rgemma: error: {error}", file=stderr)
            continue
        if report is not None:
            report(generation.stats)
