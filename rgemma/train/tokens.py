"""Token files, and packing them into rows of training batches with positions.

A token file holds a corpus tokenized once: every document as
`bos, text..., eos`, concatenated, plus the index where each document starts.
Training cuts this stream into fixed-length rows, so a row may hold the end
of one document and the start of the next; each token's position counts
from 0 within its own document, and position 0 is where the model drops its
state, so packed documents never see each other. A document cut by a row
boundary continues in the next row at its own position, from a zero state.

A target that is another document's bos says nothing about the document
before it, so it is masked (IGNORE); the eos before it is still a target,
so the model learns to end documents.

Shapes: B batch, T row length.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rgemma._io import atomic_file

IGNORE = -100  # target of a masked position (F.cross_entropy's ignore_index)
HEADER_BYTES = 4096  # the JSON header of a token file, padded with spaces
TOKEN_FORMAT = "rgemma-tokens"


# Token files ----------------------------------------------------------------
#
# Layout: a HEADER_BYTES JSON header (format, version, dtype, num_tokens,
# num_documents, vocab_size, bos_id, eos_id, tokens_offset, starts_offset),
# the tokens (uint16 when the vocabulary fits, else int32), then the int64
# start index of every document. Both arrays are memory-mapped on reading.


@dataclasses.dataclass(frozen=True)
class TokenFile:
    path: Path
    tokens: np.ndarray  # (num_tokens,) memory-mapped
    starts: np.ndarray  # (num_documents,) int64, starts[0] == 0
    vocab_size: int
    bos_id: int
    eos_id: int

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenFile:
        path = Path(path)
        try:
            with open(path, "rb") as file:
                header = json.loads(file.read(HEADER_BYTES).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = {}
        if header.get("format") != TOKEN_FORMAT:
            raise ValueError(f"{path}: not a token file (make one with tokenize_corpus / `rgemma tokenize`)")
        size = path.stat().st_size
        needed = header["starts_offset"] + 8 * header["num_documents"]
        if size < needed:
            raise ValueError(f"{path}: truncated token file ({size} bytes, expected {needed})")
        tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=header["tokens_offset"],
                           shape=(header["num_tokens"],))
        starts = np.memmap(path, dtype=np.int64, mode="r", offset=header["starts_offset"],
                           shape=(header["num_documents"],))
        return cls(path, tokens, np.asarray(starts), header["vocab_size"], header["bos_id"], header["eos_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def num_rows(self, length: int) -> int:
        """Rows of `length` inputs; each needs one more token for its last target."""
        return max(0, (len(self.tokens) - 1) // length)


def write_token_file(out: str | os.PathLike, documents: Iterator[list[int]], vocab_size: int, bos_id: int,
                     eos_id: int) -> Path:
    """Write already-tokenized documents (each starting with bos) as a token file, atomically."""
    out = Path(out)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)
    starts, count = [], 0
    with atomic_file(out) as temporary, open(temporary, "wb") as file:
        file.write(b" " * HEADER_BYTES)
        for document in documents:
            if document[0] != bos_id:
                raise ValueError(f"document {len(starts)} does not start with bos ({bos_id})")
            starts.append(count)
            file.write(np.asarray(document, dtype=dtype).tobytes())
            count += len(document)
        if not starts:
            raise ValueError(f"{out}: no documents to write")
        tokens_end = HEADER_BYTES + count * dtype.itemsize
        starts_offset = -(-tokens_end // 8) * 8
        file.write(b"\0" * (starts_offset - tokens_end))
        file.write(np.asarray(starts, dtype=np.int64).tobytes())
        header = {
            "format": TOKEN_FORMAT, "version": 1, "dtype": dtype.name, "num_tokens": count,
            "num_documents": len(starts), "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id,
            "tokens_offset": HEADER_BYTES, "starts_offset": starts_offset,
        }
        file.seek(0)
        file.write(json.dumps(header).encode().ljust(HEADER_BYTES))
    return out


def tokenize_corpus(jsonl: str | os.PathLike, tokenizer, out: str | os.PathLike) -> Path:
    """Tokenize JSON lines {"source", "id", "text"} (one document each) into a token file.

    Each document becomes `bos, text..., eos`; documents with empty text are skipped.
    """
    jsonl = Path(jsonl)

    def documents() -> Iterator[list[int]]:
        with open(jsonl, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{jsonl}:{number}: not a JSON object with a text field ({error})") from None
                if text:
                    yield tokenizer.encode(text, bos=True) + [tokenizer.eos_id]

    return write_token_file(out, documents(), tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)


# Packing --------------------------------------------------------------------


def pack_row(data: TokenFile, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row of `length` tokens at stream offset `start`: inputs, positions, targets (T,) int64.

    positions count from 0 at each document's bos; a target that is the bos of
    the next document is IGNORE.
    """
    index = np.arange(start, start + length)
    document = np.searchsorted(data.starts, index, side="right") - 1
    positions = index - data.starts[document]
    inputs = data.tokens[start : start + length].astype(np.int64)
    targets = data.tokens[start + 1 : start + length + 1].astype(np.int64)
    following = np.minimum(document + 1, len(data.starts) - 1)
    next_is_bos = (document + 1 < len(data.starts)) & (data.starts[following] == index + 1)
    targets[next_is_bos] = IGNORE
    return inputs, positions, targets


def batch(data: TokenFile, rows: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (by row number) -> tokens, positions, targets (B, T) int64."""
    packed = [pack_row(data, int(row) * length, length) for row in rows]
    return tuple(torch.from_numpy(np.stack(part)) for part in zip(*packed))


def row_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh shuffle of the rows each epoch, a pure function of (seed, epoch): resuming needs no RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_rows(num_rows: int, batch_size: int, seed: int, batch_index: int) -> np.ndarray:
    """The rows of the `batch_index`-th batch of training; a partial batch at an epoch's end is dropped."""
    per_epoch = num_rows // batch_size
    epoch, within = divmod(batch_index, per_epoch)
    return row_order(num_rows, seed, epoch)[within * batch_size : (within + 1) * batch_size]
