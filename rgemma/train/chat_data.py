"""Fine-tuning data: JSONL conversations or texts, rendered to token ids with a loss mask, packed into rows.

Each line of the file is one document:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
        rendered with the chat template of rgemma/tokenizer.py; the loss counts
        only the model's replies and the <end_of_turn> that closes each (what
        the model must learn to write), never the user's turns or the headers;
    {"text": ...}
        `bos, text..., eos`, every token after bos counted.

Rows are packed whole documents (first fit, in file order), each document
starting at position 0 so that the model resets its state there and no
document sees another; a conversation is never split across rows, and the
rest of a row is a masked padding document. A document longer than a row is
an error, as is a malformed line: each named by its line number.

Shapes: R rows, T row length.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from rgemma.tokenizer import Tokenizer, chat_prompt
from rgemma.train.tokens import IGNORE


@dataclasses.dataclass(frozen=True)
class Document:
    ids: list[int]
    trained: list[bool]  # whether the loss counts predicting ids[i] (from ids[:i])


def render_chat(tokenizer: Tokenizer, messages: list) -> Document:
    """A conversation's ids; trained marks each model reply and its <end_of_turn>."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation: messages must be a non-empty list")
    ids = chat_prompt(tokenizer, messages, add_generation_prompt=False)  # checks roles and their order
    trained = [False] * len(ids)
    after_turn_end = len(tokenizer.encode("\n"))  # the newline after <end_of_turn> is the template's, not the reply
    for i, message in enumerate(messages):
        if message["role"] not in ("assistant", "model"):
            continue
        # The conversation up to this reply, then up to its end: the reply is what lies between.
        start = len(chat_prompt(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(chat_prompt(tokenizer, messages[: i + 1], add_generation_prompt=False)) - after_turn_end
        trained[start:end] = [True] * (end - start)
    if not any(trained):
        raise ValueError("the conversation has no assistant reply to learn from")
    return Document(ids, trained)


def render_text(tokenizer: Tokenizer, text: str) -> Document:
    if not text:
        raise ValueError("empty text")
    ids = tokenizer.encode(text, bos=True) + [tokenizer.eos_id]
    return Document(ids, [False] + [True] * (len(ids) - 1))


def read_documents(path: str | os.PathLike, tokenizer: Tokenizer, max_length: int | None = None) -> list[Document]:
    """Every line of a JSONL file as a Document; a bad line, or a document of more than `max_length` tokens,
    is an error naming the file and line."""
    path = Path(path)
    documents = []
    with open(path, "rb") as lines:  # decoded line by line, so that bad UTF-8 is reported with its line
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                if isinstance(record, dict) and "messages" in record:
                    document = render_chat(tokenizer, record["messages"])
                elif isinstance(record, dict) and isinstance(record.get("text"), str):
                    document = render_text(tokenizer, record["text"])
                else:
                    raise ValueError('expected an object with "messages" (a list) or "text" (a string)')
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as error:  # UnicodeDecodeError too
                raise ValueError(f"{path}:{number}: {error}") from None
            if max_length is not None and len(document.ids) > max_length:
                raise ValueError(f"{path}:{number}: {len(document.ids)} tokens, more than a row of {max_length} "
                                 "(raise --seq-len, or shorten it)")
            documents.append(document)
    if not documents:
        raise ValueError(f"{path}: no documents")
    return documents


@dataclasses.dataclass(frozen=True)
class Rows:
    tokens: torch.Tensor  # (R, T) int64
    positions: torch.Tensor  # (R, T) int64, 0 at every document start
    targets: torch.Tensor  # (R, T) int64: the next token where the loss counts it, else IGNORE

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows) -> Rows:
        return Rows(self.tokens[rows], self.positions[rows], self.targets[rows])


def pack(documents: list[Document], length: int, pad_id: int, source: str = "data") -> Rows:
    """Whole documents into rows of `length` tokens, first fit in order; each row's tail a masked padding document."""
    too_long = next((i for i, d in enumerate(documents) if len(d.ids) > length), None)
    if too_long is not None:
        raise ValueError(f"{source}: document {too_long + 1} has {len(documents[too_long].ids)} tokens, "
                         f"more than a row of {length} (raise --seq-len, or shorten it)")
    rows: list[list[Document]] = []
    free: list[int] = []
    for document in documents:
        row = next((r for r, space in enumerate(free) if space >= len(document.ids)), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(document)
        free[row] -= len(document.ids)
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), length), dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for document in row:
            n = len(document.ids)
            ids = np.asarray(document.ids)
            tokens[r, at : at + n] = ids
            positions[r, at : at + n] = np.arange(n)
            # The target at i is ids[i + 1] where the loss counts it; a document's last token has none.
            targets[r, at : at + n - 1] = np.where(document.trained[1:], ids[1:], IGNORE)
            at += n
        positions[r, at:] = np.arange(length - at)  # the padding document: starts at 0, sees no one
    return Rows(*(torch.from_numpy(a) for a in (tokens, positions, targets)))


def load_rows(path: str | os.PathLike, tokenizer: Tokenizer, length: int) -> Rows:
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id  # any id: padding is masked
    return pack(read_documents(path, tokenizer, max_length=length), length, pad_id, source=str(path))
