"""Snapshots of the fixed-size state after shared prompt prefixes, in an LRU bounded in bytes.

A Griffin's whole past is its state (17.6 MB per sequence for the 2B model
in bf16, whatever the length), so a prompt that starts like an earlier one
can start from a copy of the state the earlier one had there, plus the
logits of its next token, and read only the rest.

A hit must give exactly the tokens of a miss. The engine reads a prompt in
chunks that end at multiples of its chunk size and at the prompt's breaks
(a chat's turn boundaries), and products over other chunkings can differ in
the last bit. So a snapshot is taken only where its request ended a chunk,
is keyed by the tokens before it *and* the breaks among them, and a request
looks up only the positions where it would end a chunk itself: from there
on, a request from a snapshot runs the products a miss runs.

Keys are digests: one running BLAKE2b over the tokens as int64, with -1
(never a token id) written for each break, read off at each chunk end.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from rgemma.state import State

BREAK = np.array([-1], dtype=np.int64).tobytes()


def chunk_ends(length: int, breaks: Iterable[int], chunk_size: int) -> list[int]:
    """The positions (1..length) where the engine ends a prefill chunk of a fresh prompt, ascending."""
    aligned = range(chunk_size, length, chunk_size)
    return sorted({*aligned, *(b for b in breaks if 0 < b < length), length})


def prefix_keys(tokens: Sequence[int], breaks: Iterable[int], ends: Iterable[int]) -> dict[int, bytes]:
    """{end: digest of tokens[:end] and the breaks before end} for each end."""
    breaks = set(breaks)
    running = hashlib.blake2b(digest_size=16)
    keys = {}
    start = 0
    for position in sorted(breaks | set(ends)):
        running.update(np.asarray(tokens[start:position], dtype=np.int64).tobytes())
        start = position
        keys[position] = running.copy().digest()  # the breaks before `position`, not at it
        if position in breaks:
            running.update(BREAK)
    return {end: keys[end] for end in ends}


@dataclasses.dataclass
class Snapshot:
    state: State  # one row
    logits: torch.Tensor  # (1, V) the next token's

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.nbytes


class PrefixCache:
    """Snapshots by key, least recently used first out, holding at most `max_bytes` of tensors."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the cache size must be at least 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[bytes, Snapshot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Snapshot | None:
        snapshot = self._entries.get(key)
        if snapshot is not None:
            self._entries.move_to_end(key)
        return snapshot

    def put(self, key: bytes, snapshot: Snapshot) -> None:
        """Keep `snapshot` (not copied), dropping the least recently used ones to make room."""
        if snapshot.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self.nbytes + snapshot.nbytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
        self._entries[key] = snapshot
        self.nbytes += snapshot.nbytes

    def longest(self, keys: dict[int, bytes]) -> tuple[int, Snapshot | None]:
        """The longest prefix among `keys` ({end: key}) that is cached: (end, snapshot), or (0, None)."""
        for end in sorted(keys, reverse=True):
            snapshot = self.get(keys[end])
            if snapshot is not None:
                return end, snapshot
        return 0, None
