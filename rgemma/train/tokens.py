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
        """Map a token file, checking its header, its size and that every token is within its vocabulary."""
        path = Path(path)
        try:
            with open(path, "rb") as file:
                header = json.loads(file.read(HEADER_BYTES).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = {}
        except OSError as error:
            raise ValueError(f"{path}: cannot read the token file: {error.strerror or error}") from None
        if not isinstance(header, dict) or header.get("format") != TOKEN_FORMAT:
            raise ValueError(f"{path}: not a token file (make one with tokenize_corpus / `rgemma tokenize`)")
        _check_header(path, header)
        size = path.stat().st_size
        needed = header["starts_offset"] + 8 * header["num_documents"]
        tokens_end = header["tokens_offset"] + np.dtype(header["dtype"]).itemsize * header["num_tokens"]
        if size < needed or tokens_end > header["starts_offset"]:
            raise ValueError(f"{path}: truncated or inconsistent token file ({size} bytes, expected {needed})")
        tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=header["tokens_offset"],
                           shape=(header["num_tokens"],))
        starts = np.asarray(np.memmap(path, dtype=np.int64, mode="r", offset=header["starts_offset"],
                                      shape=(header["num_documents"],)))
        if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= header["num_tokens"]:
            raise ValueError(f"{path}: document starts are not increasing from 0 within the tokens")
        # One pass over the tokens (a memory map: gigabytes a second); an id outside the vocabulary
        # would otherwise fail deep in the embedding, or index the wrong row.
        largest = int(tokens.max())
        if largest >= header["vocab_size"]:
            raise ValueError(f"{path}: holds token id {largest}, outside its vocabulary of {header['vocab_size']}")
        return cls(path, tokens, starts, header["vocab_size"], header["bos_id"], header["eos_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def num_rows(self, length: int) -> int:
        """Rows of `length` inputs; each needs one more token for its last target."""
        return max(0, (len(self.tokens) - 1) // length)


def _check_header(path: Path, header: dict) -> None:
    """Every field present, of its type and in range; the message names the first that is not."""
    for key in ("num_tokens", "num_documents", "vocab_size", "bos_id", "eos_id", "tokens_offset", "starts_offset"):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: header field {key} must be an integer >= 0, got {value!r}")
    if header.get("dtype") not in ("uint16", "int32"):
        raise ValueError(f"{path}: header field dtype must be uint16 or int32, got {header.get('dtype')!r}")
    if header["num_tokens"] == 0 or header["num_documents"] == 0:
        raise ValueError(f"{path}: holds no tokens")
    if header["tokens_offset"] < HEADER_BYTES or header["starts_offset"] % 8:
        raise ValueError(f"{path}: header offsets overlap the header or are misaligned")
    if not header["vocab_size"] or max(header["bos_id"], header["eos_id"]) >= header["vocab_size"]:
        raise ValueError(f"{path}: bos or eos id outside the vocabulary of {header['vocab_size']}")


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


# What json.loads returns for each JSON value, named as JSON names it.
JSON_TYPES = {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object",
              type(None): "null"}


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
                    document = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{jsonl}:{number}: not JSON ({error})") from None
                if not isinstance(document, dict) or "text" not in document:
                    raise ValueError(f"{jsonl}:{number}: not a JSON object with a text field")
                text = document["text"]
                if not isinstance(text, str):
                    raise ValueError(f"{jsonl}:{number}: the text field is {JSON_TYPES[type(text)]}, not a string")
                if not text:
                    continue
                try:
                    tokens = tokenizer.encode(text, bos=True)
                except ValueError as error:  # a lone surrogate ("\ud800" is valid JSON, not valid Unicode)
                    raise ValueError(f"{jsonl}:{number}: {error}") from None
                yield tokens + [tokenizer.eos_id]

    try:
        return write_token_file(out, documents(), tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    except UnicodeDecodeError as error:  # decoded a buffer at a time: the byte offset is what is known
        raise ValueError(f"{jsonl}: not UTF-8 text ({error.reason} near byte {error.start})") from None


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
