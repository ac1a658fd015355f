"""Where sequences stand: the fixed-size state, the logits of their next token, and the tokens read so far.

A Context can be cloned, split, merged, saved to a file and continued from
(`Engine.add(request, context)`), giving exactly the tokens an uninterrupted
run gives.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import torch

from rgemma.model import Griffin
from rgemma.state import State, StateFileError, load_state, save_state


@dataclasses.dataclass
class Context:
    state: State
    logits: torch.Tensor | None  # (B, V) float32 logits of each row's next token; None before any token
    tokens: list[list[int]]  # per row, every token read so far

    @classmethod
    def empty(cls, model: Griffin, batch_size: int) -> Context:
        return cls(model.init_state(batch_size), None, [[] for _ in range(batch_size)])

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def clone(self) -> Context:
        logits = None if self.logits is None else self.logits.clone()
        return Context(self.state.clone(), logits, [list(t) for t in self.tokens])

    def select(self, rows: Sequence[int]) -> Context:
        logits = None if self.logits is None else self.logits[list(rows)]
        return Context(self.state.select(rows), logits, [list(self.tokens[r]) for r in rows])

    @classmethod
    def merge(cls, contexts: Sequence[Context]) -> Context:
        if len({c.logits is None for c in contexts}) > 1:
            raise ValueError("cannot merge contexts that have read tokens with ones that have not")
        logits = None if contexts[0].logits is None else torch.cat([c.logits for c in contexts])
        return cls(State.merge([c.state for c in contexts]), logits, [t for c in contexts for t in c.tokens])

    def save(self, path: str | os.PathLike, model: Griffin, overwrite: bool = False,
             protected: Iterable[str | os.PathLike] = ()) -> None:
        """A safetensors file naming the model and each row's position; written atomically.

        An existing file is replaced only with `overwrite`, a `protected` one never (see `save_state`).
        """
        if self.logits is None:
            raise ValueError("an empty context has nothing to save")
        lengths = torch.tensor([len(t) for t in self.tokens])
        tokens = torch.tensor([token for row in self.tokens for token in row], dtype=torch.int64)
        save_state(path, self.state, model, extras={"logits": self.logits, "lengths": lengths, "tokens": tokens},
                   metadata={"tokens_read": str(lengths.tolist())}, overwrite=overwrite, protected=protected)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Griffin) -> Context:
        """The context in a file saved by `save`, checked as `load_state` checks the state, and its logits and
        tokens checked too: (B, V) finite float32 logits, and B rows of at least one token of the vocabulary."""
        state, extras, _ = load_state(path, model)
        if not {"logits", "lengths", "tokens"} <= extras.keys():
            raise StateFileError(f"{path}: a state file without the generation context (logits, tokens)")
        rows, vocab = state.batch_size, model.config.vocab_size
        logits, lengths, tokens = extras["logits"], extras["lengths"], extras["tokens"]
        if logits.dtype != torch.float32 or tuple(logits.shape) != (rows, vocab):
            raise StateFileError(f"{path}: extra.logits must be float32 of shape {(rows, vocab)}")
        if not bool(torch.isfinite(logits).all()):
            raise StateFileError(f"{path}: extra.logits holds NaN or infinite values")
        if lengths.dtype != torch.int64 or tuple(lengths.shape) != (rows,) or not bool((lengths >= 1).all()):
            raise StateFileError(f"{path}: extra.lengths must be int64 of shape {(rows,)}, each row at least 1 token")
        if tokens.dtype != torch.int64 or tokens.dim() != 1 or len(tokens) != int(lengths.sum()):
            raise StateFileError(f"{path}: extra.tokens must be int64 with the {int(lengths.sum())} tokens of "
                                 "extra.lengths")
        if not bool(((tokens >= 0) & (tokens < vocab)).all()):
            raise StateFileError(f"{path}: extra.tokens holds ids outside the vocabulary [0, {vocab})")
        split = torch.split(tokens, lengths.tolist())
        return cls(state, logits.to(model.device), [r.tolist() for r in split])
