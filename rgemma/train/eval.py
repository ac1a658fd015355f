"""Evaluation: loss, perplexity and bits per byte over documents of any length, and multiple-choice scoring.

A document is read in chunks of `chunk` tokens, the model's fixed-size state
carried from one chunk to the next, so memory stays at one chunk's
activations whatever the length (a 1M-token document is one pass). The
result equals a single forward over the whole document up to float rounding
(tests/test_eval.py states the tolerance).

Inputs:
    a JSONL file of {"text": ...} (a document each: every token after bos is scored)
        or {"messages": [...]} (the model's replies and their <end_of_turn> are scored,
        as in fine-tuning: rgemma/train/chat_data.py);
    any other file: plain UTF-8 text, one document, read and tokenized a block
        of lines at a time (the tokens differ from tokenizing it whole only
        where a block ends, at a line break).
Bits per byte count the UTF-8 bytes of the scored text: nats / ln 2 / bytes.

Multiple choice (lm-evaluation-harness style, from a local JSONL of
{"context", "choices", "answer"}): each choice's log-likelihood after the
context, the context read once and its state cloned for each choice; the
prediction is the most likely choice, and also the most likely per byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from rgemma.model import Griffin, prefill_chunk
from rgemma.state import State
from rgemma.tokenizer import Tokenizer
from rgemma.train.chat_data import render_chat
from rgemma.train.loss import next_token_loss
from rgemma.train.tokens import IGNORE

TEXT_BLOCK_CHARS = 1 << 20  # a plain text file is tokenized this many characters (whole lines) at a time


@dataclasses.dataclass
class Score:
    tokens: int = 0  # scored tokens
    nats: float = 0.0  # their summed negative log-likelihood
    bytes: int = 0  # UTF-8 bytes of the scored text

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "loss": self.loss, "perplexity": math.exp(self.loss),
                "bits_per_byte": self.nats / math.log(2) / max(self.bytes, 1)}


@dataclasses.dataclass(frozen=True)
class Piece:
    """A stretch of one document: its token ids, which of them are scored, and the bytes they stand for."""

    ids: list[int]
    scored: list[bool]
    bytes: int
    first: bool  # starts the document


def _pieces(path: Path, tokenizer: Tokenizer) -> Iterator[Piece]:
    if path.suffix == ".jsonl":
        with open(path, "rb") as lines:  # decoded line by line, so that bad UTF-8 is reported with its line
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                    if isinstance(record, dict) and isinstance(record.get("text"), str):
                        ids = tokenizer.encode(record["text"], bos=True)
                        yield Piece(ids, [False] + [True] * (len(ids) - 1), len(record["text"].encode()), True)
                    elif isinstance(record, dict) and "messages" in record:
                        document = render_chat(tokenizer, record["messages"])
                        replies = [m["content"].strip() for m in record["messages"] if m["role"] in ("assistant", "model")]
                        yield Piece(document.ids, document.trained, sum(len(r.encode()) for r in replies), True)
                    else:
                        raise ValueError('expected an object with "text" (a string) or "messages" (a list)')
                except (json.JSONDecodeError, ValueError, TypeError, KeyError) as error:  # UnicodeDecodeError too
                    raise ValueError(f"{path}:{number}: {error}") from None
        return
    first = True
    with open(path, encoding="utf-8") as text:
        while True:
            try:
                block = text.read(TEXT_BLOCK_CHARS)
                block += text.readline()  # end the block at a line break
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: not UTF-8 text ({error})") from None
            if not block:
                return
            ids = tokenizer.encode(block, bos=first)
            yield Piece(ids, [not (first and i == 0) for i in range(len(ids))], len(block.encode()), first)
            first = False


@torch.no_grad()
def _score_stream(model: Griffin, pieces: Iterator[Piece], chunk: int) -> Score:
    """Feed each document through the model `chunk` tokens at a time, carrying the state; sum the scores."""
    score = Score()
    state: State | None = None
    ids: list[int] = []  # the current document's tokens read but not yet fed
    scored: list[bool] = []

    def feed(n: int):
        """Feed ids[:n], whose targets are ids[1 : n + 1]; keep the rest."""
        nonlocal state, ids, scored
        targets = [t if s else IGNORE for t, s in zip(ids[1 : n + 1], scored[1 : n + 1])]
        hidden, state = model(torch.tensor([ids[:n]], device=model.device), state=state, hidden_only=True)
        targets = torch.tensor([targets], device=model.device)
        score.nats += float(next_token_loss(model, hidden.float(), targets, count=1))
        score.tokens += int((targets != IGNORE).sum())
        ids, scored = ids[n:], scored[n:]

    for piece in pieces:
        if piece.first:  # a new document: the last token of the one before has nothing to predict
            if len(ids) > 1:
                feed(len(ids) - 1)
            ids, scored, state = [], [], None
        score.bytes += piece.bytes
        ids, scored = ids + piece.ids, scored + piece.scored
        while len(ids) > chunk:  # a full chunk and the target of its last token
            feed(chunk)
    if len(ids) > 1:
        feed(len(ids) - 1)
    return score


def evaluate_file(model: Griffin, tokenizer: Tokenizer, path: str | os.PathLike, chunk: int | None = None) -> Score:
    """Loss, perplexity and bits per byte of the model on a text or JSONL file (see the module docstring)."""
    return _score_stream(model.eval(), _pieces(Path(path), tokenizer), chunk or prefill_chunk(model.device))


# Multiple choice -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
    questions: int
    accuracy: float  # the most likely choice is the answer
    accuracy_per_byte: float  # the choice most likely per UTF-8 byte is the answer (lm-eval's acc_norm)
    log_likelihoods: list[list[float]]

    def to_dict(self) -> dict:
        return {"questions": self.questions, "accuracy": self.accuracy, "accuracy_per_byte": self.accuracy_per_byte}


def _question(record, where: str) -> tuple[str, list[str], int]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with context, choices and answer")
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        raise ValueError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least two non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer must be the index of a choice (0 to {len(choices) - 1}), got {answer!r}")
    return context, choices, answer


@torch.no_grad()
def choice_log_likelihoods(model: Griffin, tokenizer: Tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(choice | context) of each choice, summed over its tokens; the context is read once."""
    context_ids = tokenizer.encode(context, bos=True)
    logits, state = model.prefill(torch.tensor([context_ids], device=model.device))
    scores = []
    for choice in choices:
        ids = tokenizer.encode(choice)
        first = torch.log_softmax(logits[0].float(), dim=-1)[ids[0]]
        rest = 0.0
        if len(ids) > 1:
            out, _ = model(torch.tensor([ids[:-1]], device=model.device), state=state.clone())
            log_probs = torch.log_softmax(out[0].float(), dim=-1)  # (n - 1, V)
            rest = float(log_probs.gather(1, torch.tensor(ids[1:], device=model.device)[:, None]).sum())
        scores.append(float(first) + rest)
    return scores


def score_choices(model: Griffin, tokenizer: Tokenizer, path: str | os.PathLike) -> ChoiceResult:
    model.eval()
    path = Path(path)
    right = right_per_byte = 0
    all_scores = []
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            context, choices, answer = _question(record, f"{path}:{number}")
            scores = choice_log_likelihoods(model, tokenizer, context, choices)
            per_byte = [s / len(c.encode()) for s, c in zip(scores, choices)]
            right += max(range(len(choices)), key=scores.__getitem__) == answer
            right_per_byte += max(range(len(choices)), key=per_byte.__getitem__) == answer
            all_scores.append(scores)
    if not all_scores:
        raise ValueError(f"{path}: no questions")
    n = len(all_scores)
    return ChoiceResult(n, right / n, right_per_byte / n, all_scores)
