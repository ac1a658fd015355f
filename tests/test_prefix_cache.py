"""The prefix cache alone: keys, longest match, and the byte bound."""

import pytest
import torch

from rgemma.server.prefix_cache import PrefixCache, Snapshot, chunk_ends, prefix_keys
from rgemma.state import State


def snapshot(nbytes: int) -> Snapshot:
    state = State(position=torch.zeros(1, dtype=torch.int64), layers=[])
    return Snapshot(state, torch.zeros(1, (nbytes - state.nbytes) // 4))


def test_chunk_ends_are_aligned_boundaries_breaks_and_the_end():
    assert chunk_ends(40, [5, 16, 40, 41], 16) == [5, 16, 32, 40]
    assert chunk_ends(16, [], 16) == [16]


def test_keys_differ_with_tokens_and_with_the_breaks_before_them():
    tokens = list(range(20))
    keys = prefix_keys(tokens, [4], [8, 16])
    assert keys == prefix_keys(tokens + [99], [4, 18], [8, 16])  # only what comes before each end counts
    assert keys[8] != prefix_keys(tokens, [], [8])[8]  # a break at 4 changes how the prefix was read
    assert keys[8] != prefix_keys(tokens[:7] + [0] + tokens[8:], [4], [8])[8]
    assert prefix_keys(tokens, [8], [8])[8] == prefix_keys(tokens, [], [8])[8]  # a break at the end is no chunk end before it


def test_longest_cached_prefix_and_lru_by_bytes():
    cache = PrefixCache(max_bytes=3000)
    keys = prefix_keys(list(range(64)), [], [16, 32, 48])
    first, second = snapshot(1000), snapshot(1000)
    cache.put(keys[16], first)
    cache.put(keys[32], second)
    assert cache.longest(keys) == (32, second) and cache.nbytes == 2000
    assert cache.longest(keys) == (32, second)
    cache.get(keys[16])  # now the most recently used
    cache.put(keys[48], snapshot(1500))  # over the bound: the least recently used (32) goes
    assert len(cache) == 2 and cache.get(keys[32]) is None and cache.nbytes == 2500
    cache.put(keys[48], snapshot(1200))  # replacing an entry counts its size once
    assert cache.nbytes == 2200
    cache.put(b"huge", snapshot(4000))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 2 and cache.get(b"huge") is None


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="at least 0 bytes"):
        PrefixCache(-1)
