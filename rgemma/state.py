"""The fixed-size state of a Griffin model: everything a sequence leaves behind.

Per layer it is either a recurrent state (the RG-LRU hidden state in float32
and the last `conv_width - 1` inputs of the temporal convolution) or an
attention state (a ring buffer of exactly one window of keys and values, with
the document position of each slot). Its size depends on the batch size and
the config, never on how many tokens were seen.

The one rule, the same on every device and every path (the model's forward
and step, the native CPU step, a replayed CUDA graph): **reading tokens
updates the State it is given in place and returns that same object**. Its
tensors keep their identity, shape, dtype and storage; only their values
change. So a pool of sequences can hand out views of its rows and see them
move on, and a CUDA graph can replay over them. `clone`, `select` and
`merge` return new states that share nothing with the old; to keep a
snapshot, `clone()` before reading on.

Shapes: B batch, L lru width, C conv taps (conv_width - 1), W window, K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rgemma._io import atomic_file
from rgemma.config import RECURRENT, Config


@dataclasses.dataclass
class RecurrentState:
    h: torch.Tensor  # (B, L) float32
    conv: torch.Tensor  # (B, C, L) float32 inputs of the conv, oldest first


@dataclasses.dataclass
class AttentionState:
    k: torch.Tensor  # (B, W, K) keys after RoPE; slot = position % W
    v: torch.Tensor  # (B, W, K)
    pos: torch.Tensor  # (B, W) int64 document position of each slot, -1 when empty


LayerState = RecurrentState | AttentionState


def _map_layer(layer: LayerState, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerState:
    return type(layer)(**{f.name: fn(getattr(layer, f.name)) for f in dataclasses.fields(layer)})


@functools.cache
def _field_names(layer_state: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(layer_state))  # once per class: a decode step reads them


@dataclasses.dataclass
class State:
    position: torch.Tensor  # (B,) int64 document position of each row's next token
    layers: list[LayerState]

    @classmethod
    def zeros(
        cls,
        config: Config,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> State:
        """An empty state: as if nothing had been read. `dtype` is that of the activations, which the
        attention rings keep; the recurrent parts are float32 whatever it is, so that every backend's decode
        step (which computes them in float32) reads and writes them in place."""
        layers: list[LayerState] = []
        for block_type in config.block_types:
            if block_type == RECURRENT:
                layers.append(RecurrentState(
                    h=torch.zeros(batch_size, config.lru_width, dtype=torch.float32, device=device),
                    conv=torch.zeros(batch_size, config.conv_width - 1, config.lru_width, dtype=torch.float32,
                                     device=device),
                ))
            else:
                shape = (batch_size, config.attention_window, config.head_dim)
                layers.append(AttentionState(
                    k=torch.zeros(shape, dtype=dtype, device=device),
                    v=torch.zeros(shape, dtype=dtype, device=device),
                    pos=torch.full(shape[:2], -1, dtype=torch.int64, device=device),
                ))
        position = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls(position=position, layers=layers)

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
        """A new state with `fn` applied to every tensor."""
        return State(position=fn(self.position), layers=[_map_layer(layer, fn) for layer in self.layers])

    def layer_tensors(self) -> list[list[torch.Tensor]]:
        """Each layer's tensors, in field order: [h, conv] or [k, v, pos]."""
        return [[getattr(layer, name) for name in _field_names(type(layer))] for layer in self.layers]

    def tensors(self) -> list[torch.Tensor]:
        return [self.position] + [t for layer in self.layer_tensors() for t in layer]

    def clone(self) -> State:
        return self.map(torch.clone)

    def to(self, device: torch.device | str) -> State:
        return self.map(lambda t: t.to(device))

    def select(self, rows: Sequence[int] | torch.Tensor) -> State:
        """A new state holding only the given batch rows, in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.position.device)
        return self.map(lambda t: t.index_select(0, index))

    @classmethod
    def merge(cls, states: Sequence[State]) -> State:
        """Concatenate the rows of several states of the same model."""
        if not states:
            raise ValueError("merge needs at least one state")
        first = states[0]
        for other in states[1:]:
            if len(other.layers) != len(first.layers) or any(
                type(a) is not type(b) or getattr(a, f.name).shape[1:] != getattr(b, f.name).shape[1:]
                for a, b in zip(first.layers, other.layers)
                for f in dataclasses.fields(a)
            ):
                raise ValueError("cannot merge states of different models")
        return State(
            position=torch.cat([s.position for s in states]),
            layers=[
                type(layer)(**{
                    f.name: torch.cat([getattr(s.layers[i], f.name) for s in states])
                    for f in dataclasses.fields(layer)
                })
                for i, layer in enumerate(first.layers)
            ],
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


# State files ---------------------------------------------------------------

STATE_FORMAT = "rgemma-state-1"


class StateFileError(ValueError):
    """A state file that cannot be read or belongs to another model; the message names the file."""


def model_fingerprint(model) -> str:
    """Identifies a model's weights cheaply: its config and a hash of its (small) norm scales.

    Two checkpoints of the same architecture (a base model and its -it
    variant, say) have different norm scales, so their states never mix.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _state_tensors(state: State) -> dict[str, torch.Tensor]:
    tensors = {"position": state.position}
    for i, layer in enumerate(state.layers):
        for field in dataclasses.fields(layer):
            tensors[f"layers.{i}.{field.name}"] = getattr(layer, field.name)
    return tensors


def save_state(
    path: str | os.PathLike,
    state: State,
    model,
    extras: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state (with optional extra tensors, e.g. next-token logits) as safetensors, atomically.

    The header names the model (config and fingerprint) and each row's position.
    """
    path = Path(path)
    tensors = _state_tensors(state) | {f"extra.{name}": t for name, t in (extras or {}).items()}
    header = {
        **(metadata or {}),
        "format": STATE_FORMAT,
        "model": model_fingerprint(model),
        "config": json.dumps(model.config.to_hf_dict(), sort_keys=True),
        "layer_types": json.dumps([type(layer).__name__ for layer in state.layers]),
        "position": json.dumps(state.position.tolist()),
    }
    with atomic_file(path) as temporary:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, temporary, metadata=header)


def load_state(path: str | os.PathLike, model) -> tuple[State, dict[str, torch.Tensor], dict[str, str]]:
    """Read a state file written by `save_state` for this same model: (state, extras, header)."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise StateFileError(f"{path}: not a readable state file: {str(error).splitlines()[0]}") from error
    if header.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path}: not an rgemma state file (format {header.get('format')!r})")
    if header.get("model") != model_fingerprint(model):
        raise StateFileError(f"{path}: the state was saved from another model (fingerprint {header.get('model')})")
    kinds = {"RecurrentState": RecurrentState, "AttentionState": AttentionState}
    layers = []
    for i, kind in enumerate(json.loads(header["layer_types"])):
        cls = kinds[kind]
        layers.append(cls(**{f.name: tensors[f"layers.{i}.{f.name}"] for f in dataclasses.fields(cls)}))
    state = State(position=tensors["position"], layers=layers).to(model.device)
    extras = {name.removeprefix("extra."): t for name, t in tensors.items() if name.startswith("extra.")}
    return state, extras, header
