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
from collections.abc import Callable, Iterable, Sequence
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
RING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Positions beyond this are refused: far past any sequence, and position + window never overflows int64.
MAX_POSITION = 2**62


class StateFileError(ValueError):
    """A state file that cannot be read or written, is damaged, or belongs to another model; the message names
    the file."""


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
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
) -> None:
    """Write a state (with optional extra tensors, e.g. next-token logits) as safetensors, atomically.

    The header names the model (config and fingerprint) and each row's
    position. An existing file is replaced only with `overwrite`, and a
    `protected` one (the model's own files) never.
    """
    path = Path(path)
    check_target(path, overwrite, protected)
    tensors = _state_tensors(state) | {f"extra.{name}": t for name, t in (extras or {}).items()}
    header = {
        **(metadata or {}),
        "format": STATE_FORMAT,
        "model": model_fingerprint(model),
        "config": json.dumps(model.config.to_hf_dict(), sort_keys=True),
        "layer_types": json.dumps([type(layer).__name__ for layer in state.layers]),
        "position": json.dumps(state.position.tolist()),
    }
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    try:
        with atomic_file(path) as temporary:
            save_file(tensors, temporary, metadata=header)
    except SafetensorError as error:  # safetensors reports a full disk this way
        raise StateFileError(f"{path}: cannot write the state: {str(error).splitlines()[0]}") from error
    except OSError as error:  # its own message names the hidden temporary file, not the one asked for
        raise StateFileError(f"{path}: cannot write the state: {error.strerror or error}") from error


def load_state(path: str | os.PathLike, model) -> tuple[State, dict[str, torch.Tensor], dict[str, str]]:
    """Read a state file written by `save_state` for this same model: (state, extras, header).

    The file is untrusted input, like a checkpoint: before anything computes
    with it, its tensors must be exactly those of `State.zeros` for the model
    (names, shapes, dtypes), finite, and its positions in range.
    """
    path = Path(path)
    if path.is_dir():  # safetensors would say "No such device"
        raise StateFileError(f"{path}: is a directory, not a state file")
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
    state = _checked_state(path, tensors, model).to(model.device)
    extras = {name.removeprefix("extra."): t for name, t in tensors.items() if name.startswith("extra.")}
    return state, extras, header


def _checked_state(path: Path, tensors: dict[str, torch.Tensor], model) -> State:
    position = tensors.get("position")
    if position is None or position.dtype != torch.int64 or position.dim() != 1 or len(position) == 0:
        raise StateFileError(f"{path}: tensor position must be a non-empty int64 (B,) tensor")
    if not bool(((position >= 0) & (position <= MAX_POSITION)).all()):
        raise StateFileError(f"{path}: tensor position holds values outside [0, {MAX_POSITION}]")
    # The shapes and dtypes a state of this model has, computed on the meta device: nothing is allocated.
    expected = State.zeros(model.config, len(position), dtype=model.activation_dtype, device="meta")
    expected_tensors = _state_tensors(expected)
    unexpected = sorted(name for name in tensors.keys() - expected_tensors.keys() if not name.startswith("extra."))
    if unexpected:
        raise StateFileError(f"{path}: unexpected tensors {unexpected[:3]}: not a state of this model")
    rings = {f"layers.{i}.{field}" for i, layer in enumerate(expected.layers) if isinstance(layer, AttentionState)
             for field in ("k", "v")}
    checked = {}
    for name, like in expected_tensors.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise StateFileError(f"{path}: missing tensor {name}")
        if tuple(tensor.shape) != tuple(like.shape):
            raise StateFileError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model's state needs {tuple(like.shape)}"
            )
        # The attention rings are kept in the activations' dtype, which depends on the machine (a bf16 model
        # computes in float32 where the CPU has no fast bf16): any float dtype is taken and converted.
        allowed = RING_DTYPES if name in rings else (like.dtype,)
        if tensor.dtype not in allowed:
            raise StateFileError(
                f"{path}: tensor {name} has dtype {tensor.dtype}, the model's state needs {like.dtype}"
            )
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise StateFileError(f"{path}: tensor {name} holds NaN or infinite values")
        checked[name] = tensor.to(like.dtype)
    layers = []
    for i, like in enumerate(expected.layers):
        layer = type(like)(**{f.name: checked[f"layers.{i}.{f.name}"] for f in dataclasses.fields(like)})
        if isinstance(layer, AttentionState):
            _check_ring(path, f"layers.{i}.pos", layer.pos, checked["position"])
        layers.append(layer)
    return State(position=checked["position"], layers=layers)


def _check_ring(path: Path, name: str, ring: torch.Tensor, position: torch.Tensor) -> None:
    """Each slot is empty (-1) or holds an earlier position of its row, in the slot position % W."""
    window = ring.shape[1]
    slot = torch.arange(window)
    valid = (ring == -1) | ((ring >= 0) & (ring < position[:, None]) & (ring % window == slot))
    if not bool(valid.all()):
        row, column = (~valid).nonzero()[0].tolist()
        raise StateFileError(
            f"{path}: tensor {name} holds {ring[row, column].item()} in slot {column} of row {row}, which is "
            f"neither empty (-1) nor an earlier position stored at position % {window}"
        )


def check_target(path: str | os.PathLike, overwrite: bool, protected: Iterable[str | os.PathLike] = (),
                 force: str = "--force") -> None:
    """Refuse to write onto a protected file (the loaded model's), or onto an existing one without `overwrite`
    (which `force` says how to ask for)."""
    path = Path(path)
    for other in protected:
        if path.resolve() == Path(other).resolve() or (path.exists() and Path(other).exists()
                                                        and os.path.samefile(path, other)):
            raise FileExistsError(f"{path}: is a file of the loaded model; will not overwrite it")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; will not overwrite it without {force}")
