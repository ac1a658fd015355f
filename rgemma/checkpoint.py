"""Checkpoint formats: Hugging Face safetensors, official PyTorch and official Flax/Orbax.

Loading builds the model on the meta device and assigns tensors read from
memory-mapped files, so a checkpoint is never held twice: loading a bf16
checkpoint as bf16 costs the weights' size and no more. Every tensor name and
shape is checked against the model before anything is read.

Each format names our tensors through a table (`{i}` is the layer index) and
small fix-up functions that turn its layout into ours. The fix-ups return
views, so a transposed official tensor is not copied either; such parameters
are non-contiguous, which every torch op accepts.

Saving always writes the Hugging Face layout, which transformers can read.
Quantized models (rgemma/quantize.py) are saved in that layout too, their
format recorded in config.json and in every safetensors header; loading
reads the format from there, and can also quantize a float checkpoint
tensor by tensor as it loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rgemma._io import atomic_directory
from rgemma.config import ATTENTION, RECURRENT, Config
from rgemma.model import CONV, EMBEDDING, FINAL_NORM, MLP_LINEARS, NORMS, RG_LRU, TEMPORAL_LINEARS, Griffin
from rgemma.quantize import (
    DEFAULT_GROUP_SIZE, Quantization, check_format, format_dtypes, quantizable, quantize_model, quantize_weight,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANTIZATION_KEY = "quantization"  # in config.json and in the safetensors headers
TIED_HEAD = "lm_head.weight"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Files that mark an Orbax checkpoint directory (older and newer orbax versions).
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "checkpoint")
MAX_SHARD_BYTES = 5 * 10**9
# A bad checkpoint usually has many bad tensors; the first few say what is wrong.
MAX_PROBLEMS_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def _first_line(error: BaseException) -> str:
    """The error, on one line: libraries' messages run to paragraphs."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# Fix-ups: an official tensor -> ours ---------------------------------------

Fix = Callable[[torch.Tensor], torch.Tensor]


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def conv_taps(w: torch.Tensor) -> torch.Tensor:
    """(C, L) taps, oldest first -> torch Conv1d layout (L, 1, C)."""
    return w.T[:, None, :]


def mlp_gate_weight(w: torch.Tensor) -> torch.Tensor:
    """ffw_up.w (2, D, M) holds both branches as [in, out]; [0] is the gate."""
    return w[0].T


def mlp_up_weight(w: torch.Tensor) -> torch.Tensor:
    return w[1].T


def mlp_gate_bias(b: torch.Tensor) -> torch.Tensor:
    """ffw_up.b (2, 1, 1, M) -> (M,)."""
    return b[0, 0, 0]


def mlp_up_bias(b: torch.Tensor) -> torch.Tensor:
    return b[1, 0, 0]


# Our names, from the model's weight table: a block's parts by role.
_GATE, _UP, _DOWN = MLP_LINEARS
_Y, _X, _OUT = TEMPORAL_LINEARS[RECURRENT]
_Q, _K, _V, _O = TEMPORAL_LINEARS[ATTENTION]
_TEMPORAL_NORM, _CHANNEL_NORM = NORMS
_BLOCK = "layers.{i}."  # {i}: the layer index
EMBEDDING_WEIGHT = f"{EMBEDDING}.weight"
FINAL_NORM_WEIGHT = f"{FINAL_NORM}.weight"

# Our name -> (official name, fix-up). Flax uses the same names, nested, with
# Dense `kernel`s stored [in, out] (see `_read_orbax`).
OFFICIAL_NAMES: dict[str, tuple[str, Fix]] = {
    EMBEDDING_WEIGHT: ("embedder.input_embedding", same),
    FINAL_NORM_WEIGHT: ("final_norm.scale", same),
    f"{_BLOCK}{_TEMPORAL_NORM}.weight": ("blocks.{i}.temporal_pre_norm.scale", same),
    f"{_BLOCK}{_CHANNEL_NORM}.weight": ("blocks.{i}.channel_pre_norm.scale", same),
    f"{_BLOCK}{_GATE}.weight": ("blocks.{i}.mlp_block.ffw_up.w", mlp_gate_weight),
    f"{_BLOCK}{_UP}.weight": ("blocks.{i}.mlp_block.ffw_up.w", mlp_up_weight),
    f"{_BLOCK}{_GATE}.bias": ("blocks.{i}.mlp_block.ffw_up.b", mlp_gate_bias),
    f"{_BLOCK}{_UP}.bias": ("blocks.{i}.mlp_block.ffw_up.b", mlp_up_bias),
    f"{_BLOCK}{_DOWN}.weight": ("blocks.{i}.mlp_block.ffw_down.weight", same),
    f"{_BLOCK}{_DOWN}.bias": ("blocks.{i}.mlp_block.ffw_down.bias", same),
    # Recurrent layers.
    f"{_BLOCK}{_X}.weight": ("blocks.{i}.recurrent_block.linear_x.weight", same),
    f"{_BLOCK}{_X}.bias": ("blocks.{i}.recurrent_block.linear_x.bias", same),
    f"{_BLOCK}{_Y}.weight": ("blocks.{i}.recurrent_block.linear_y.weight", same),
    f"{_BLOCK}{_Y}.bias": ("blocks.{i}.recurrent_block.linear_y.bias", same),
    f"{_BLOCK}{_OUT}.weight": ("blocks.{i}.recurrent_block.linear_out.weight", same),
    f"{_BLOCK}{_OUT}.bias": ("blocks.{i}.recurrent_block.linear_out.bias", same),
    f"{_BLOCK}{CONV}.weight": ("blocks.{i}.recurrent_block.conv_1d.w", conv_taps),
    f"{_BLOCK}{CONV}.bias": ("blocks.{i}.recurrent_block.conv_1d.b", same),
    f"{_BLOCK}{RG_LRU}.recurrent_param": ("blocks.{i}.recurrent_block.rg_lru.a_param", same),
    f"{_BLOCK}{RG_LRU}.input_gate_weight": ("blocks.{i}.recurrent_block.rg_lru.input_gate.w", same),
    f"{_BLOCK}{RG_LRU}.input_gate_bias": ("blocks.{i}.recurrent_block.rg_lru.input_gate.b", same),
    f"{_BLOCK}{RG_LRU}.recurrent_gate_weight": ("blocks.{i}.recurrent_block.rg_lru.a_gate.w", same),
    f"{_BLOCK}{RG_LRU}.recurrent_gate_bias": ("blocks.{i}.recurrent_block.rg_lru.a_gate.b", same),
    # Attention layers.
    f"{_BLOCK}{_Q}.weight": ("blocks.{i}.attention_block.proj_q.weight", same),
    f"{_BLOCK}{_K}.weight": ("blocks.{i}.attention_block.proj_k.weight", same),
    f"{_BLOCK}{_V}.weight": ("blocks.{i}.attention_block.proj_v.weight", same),
    f"{_BLOCK}{_O}.weight": ("blocks.{i}.attention_block.proj_final.weight", same),
    f"{_BLOCK}{_O}.bias": ("blocks.{i}.attention_block.proj_final.bias", same),
}


def official_name(ours: str) -> tuple[str, Fix]:
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    if layer is None:
        return OFFICIAL_NAMES[ours]
    theirs, fix = OFFICIAL_NAMES[_BLOCK + layer[2]]
    return theirs.format(i=layer[1]), fix


HF_PREFIX = "model."


def hf_name(ours: str) -> tuple[str, Fix]:
    return HF_PREFIX + ours, same


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a format names our tensors."""

    name: Callable[[str], tuple[str, Fix]]  # our name -> its name, fix-up
    layer: re.Pattern  # matches its names of layer tensors; group 1 is the layer index


HF_NAMING = Naming(hf_name, re.compile(r"model\.layers\.(\d+)\."))
OFFICIAL_NAMING = Naming(official_name, re.compile(r"blocks\.(\d+)\."))


def quantized_hf_naming(modules: tuple[str, ...]) -> Naming:
    """HF names, where a quantized module's weight is found as its qweight, whose rows are the weight's.

    Only the config inference asks for such weights (their row counts and
    presence); the quantized model itself names qweight, scale and minimum.
    """
    quantized = set(modules)

    def name(ours: str) -> tuple[str, Fix]:
        module = ours.removesuffix(".weight")
        if module != ours and module in quantized:
            return f"{HF_PREFIX}{module}.qweight", same
        return hf_name(ours)

    return Naming(name, HF_NAMING.layer)


# Reading ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor in a checkpoint file, read only when needed (usually a memory map)."""

    file: Path
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    dtype: torch.dtype | None = None  # where the file tells it without reading


@dataclasses.dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, Stored]  # by the names in the file
    naming: Naming
    hf_config: dict | None = None  # config.json, for Hugging Face directories
    tied_head: Stored | None = None  # lm_head.weight, which must equal the embedding
    quantization: Quantization | None = None  # its "quantization" record, if any


def _open(path: Path, files: contextlib.ExitStack) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / CONFIG_FILE).exists() or (path / INDEX_FILE).exists() or any(path.glob("*.safetensors")):
            return _open_hf(path, files)
        if any((path / marker).exists() for marker in ORBAX_MARKERS):
            return Checkpoint(path, _read_orbax(path), OFFICIAL_NAMING)
    elif path.suffix in (".pt", ".pth") or _is_zip(path):  # torch.save writes a zip archive
        return Checkpoint(path, _read_torch(path), OFFICIAL_NAMING)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected a Hugging Face directory (config.json and "
        f"{WEIGHTS_FILE} or {INDEX_FILE}), an official PyTorch .pt file or an Orbax/Flax checkpoint directory"
    )


def _is_zip(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: cannot read JSON: {_first_line(error)}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return value


def _open_hf(directory: Path, files: contextlib.ExitStack) -> Checkpoint:
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory}: missing {CONFIG_FILE}")
    hf_config = _read_json(directory / CONFIG_FILE)
    if (directory / INDEX_FILE).is_file():
        weight_map = _read_json(directory / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{directory / INDEX_FILE}: has no weight_map")
    elif (directory / WEIGHTS_FILE).is_file():
        weight_map = None
    else:
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")

    headers = {}
    if weight_map is None:
        tensors, headers[WEIGHTS_FILE] = _read_safetensors(directory / WEIGHTS_FILE, files)
    else:
        tensors = {}
        shards: dict[str, dict[str, Stored]] = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                if not (directory / shard).is_file():
                    raise CheckpointError(f"{directory / INDEX_FILE}: names shard {shard}, which is missing")
                shards[shard], headers[shard] = _read_safetensors(directory / shard, files)
            if name not in shards[shard]:
                raise CheckpointError(f"{directory / shard}: lacks tensor {name}, which {INDEX_FILE} places there")
            tensors[name] = shards[shard][name]
    tied_head = tensors.pop(TIED_HEAD, None)
    record = _quantization_record(directory, hf_config, headers)
    naming = HF_NAMING if record is None else quantized_hf_naming(record.modules)
    return Checkpoint(directory, tensors, naming, hf_config=hf_config, tied_head=tied_head, quantization=record)


def _quantization_record(directory: Path, hf_config: dict, headers: dict[str, dict]) -> Quantization | None:
    """The checkpoint's quantization record; config.json and every safetensors header must hold the same."""
    declared = hf_config.get(QUANTIZATION_KEY)
    try:
        record = None if declared is None else Quantization.from_json(declared, prefix=HF_PREFIX)
    except ValueError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from error
    for file, header in headers.items():
        text = header.get(QUANTIZATION_KEY)
        if declared is None and text is not None:
            raise CheckpointError(f"{directory / file}: header records a quantization that {CONFIG_FILE} lacks")
        if declared is not None and text is None:
            raise CheckpointError(f"{directory / file}: header lacks the quantization that {CONFIG_FILE} records")
        try:
            same_record = text is None or json.loads(text) == declared
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{directory / file}: header field quantization is not JSON: {error}") from error
        if not same_record:
            raise CheckpointError(f"{directory / file}: header quantization differs from the one in {CONFIG_FILE}")
    return record


# safetensors' dtype names, for checking the quantized formats before reading.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(file: Path, files: contextlib.ExitStack) -> tuple[dict[str, Stored], dict[str, str]]:
    """The file's tensors and its header metadata."""
    try:
        # safe_open memory-maps the file; get_tensor returns a view of the map.
        handle = files.enter_context(safe_open(file, framework="pt"))
        tensors = {}
        for name in handle.keys():
            info = handle.get_slice(name)
            tensors[name] = Stored(file, tuple(info.get_shape()), functools.partial(handle.get_tensor, name),
                                   SAFETENSORS_DTYPES.get(info.get_dtype()))
        return tensors, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {_first_line(error)}"
        ) from error


def _read_torch(file: Path) -> dict[str, Stored]:
    try:
        # weights_only never unpickles arbitrary objects; mmap maps the file instead of reading it.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{file}: not a plain state dict of tensors (it holds other objects, or is corrupt)"
        ) from error
    except Exception as error:  # torch.load raises many types for damaged or foreign files
        raise CheckpointError(
            f"{file}: not a readable PyTorch state dict (truncated or corrupt?): {_first_line(error)}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors (an official state dict)")
    return {name: Stored(file, tuple(t.shape), functools.partial(same, t)) for name, t in state.items()}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> {"a.b.c": leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _map_leaves(tree: dict, fn: Callable) -> dict:
    return {key: _map_leaves(value, fn) if isinstance(value, dict) else fn(value) for key, value in tree.items()}


def _from_numpy(array) -> torch.Tensor:
    if array.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own: reinterpret the bits
        return torch.from_numpy(array.view("uint16")).view(torch.bfloat16)
    return torch.from_numpy(array)


def _read_orbax(directory: Path) -> dict[str, Stored]:
    """The Flax parameter tree, named as the official torch state dict."""
    try:
        import numpy as np
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise CheckpointError(
            f"{directory}: reading Orbax/Flax checkpoints needs orbax-checkpoint: pip install 'rgemma[flax]'"
        ) from error
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(directory)
    except Exception as error:  # orbax raises many types for damaged or foreign directories
        raise CheckpointError(f"{directory}: not a readable Orbax checkpoint: {_first_line(error)}") from error
    # Newer orbax wraps the tree of array metadata.
    metadata = getattr(metadata, "item_metadata", metadata)
    tree = getattr(metadata, "tree", metadata)

    def official(flat: dict) -> dict:
        # The official release nests everything under "params".
        return {name.removeprefix("params."): value for name, value in flat.items()}

    @functools.cache
    def restore() -> dict[str, torch.Tensor]:
        args = _map_leaves(tree, lambda _: ocp.RestoreArgs(restore_type=np.ndarray))
        try:
            restored = checkpointer.restore(directory, restore_args=args)
        except Exception as error:  # as above
            raise CheckpointError(f"{directory}: cannot restore the Orbax checkpoint: {_first_line(error)}") from error
        return {name: _from_numpy(array) for name, array in official(_flatten(restored)).items()}

    tensors = {}
    for name, leaf in official(_flatten(tree)).items():
        if name.endswith(".kernel"):  # Flax Dense kernels are [in, out]
            tensors[name.removesuffix("kernel") + "weight"] = Stored(
                directory, tuple(reversed(leaf.shape)), lambda name=name: restore()[name].T
            )
        else:
            tensors[name] = Stored(directory, tuple(leaf.shape), lambda name=name: restore()[name])
    return tensors


# Config ----------------------------------------------------------------------

# Config fields that tensor shapes determine, and the config.json key of each.
SHAPE_FIELDS = {
    "vocab_size": "vocab_size",
    "width": "hidden_size",
    "mlp_width": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "block_types": "block_types (or _block_types)",
    "num_heads": "num_attention_heads",
    "lru_width": "lru_width",
}


def _fixed_shape(stored: Stored, fix: Fix) -> tuple[int, ...] | None:
    """The shape `fix` gives the stored tensor, worked out on the meta device; None if it does not apply."""
    try:
        return tuple(fix(torch.empty(stored.shape, device="meta")).shape)
    except (IndexError, RuntimeError):
        return None


def _shape(checkpoint: Checkpoint, ours: str, ndim: int) -> tuple[int, ...]:
    theirs, fix = checkpoint.naming.name(ours)
    stored = checkpoint.tensors.get(theirs)
    if stored is None:
        raise CheckpointError(f"{checkpoint.path}: missing tensor {theirs}")
    shape = _fixed_shape(stored, fix)
    if shape is None or len(shape) != ndim:
        raise CheckpointError(f"{stored.file}: tensor {theirs} has shape {stored.shape}, which does not fit {ours}")
    return shape


def _block_type(checkpoint: Checkpoint, layer: int) -> str:
    markers = {
        RECURRENT: checkpoint.naming.name(f"layers.{layer}.{RG_LRU}.recurrent_param")[0],
        ATTENTION: checkpoint.naming.name(f"layers.{layer}.{_Q}.weight")[0],
    }
    found = [kind for kind, name in markers.items() if name in checkpoint.tensors]
    if len(found) != 1:
        raise CheckpointError(
            f"{checkpoint.path}: cannot tell layer {layer}'s type: expected exactly one of the tensors "
            f"{' and '.join(markers.values())}, found {len(found)}"
        )
    return found[0]


def _shape_fields(checkpoint: Checkpoint) -> dict:
    """The config fields that tensor shapes tell."""
    layers = {int(match[1]) for name in checkpoint.tensors if (match := checkpoint.naming.layer.match(name))}
    if not layers:
        example = checkpoint.naming.name(f"layers.0.{_TEMPORAL_NORM}.weight")[0]
        raise CheckpointError(f"{checkpoint.path}: has no layer tensors (with names like {example})")
    # Rows only: a quantized embedding's row length is packed (int4), the norm's is not.
    vocab_size = _shape(checkpoint, EMBEDDING_WEIGHT, 2)[0]
    (width,) = _shape(checkpoint, FINAL_NORM_WEIGHT, 1)
    block_types = tuple(_block_type(checkpoint, layer) for layer in range(max(layers) + 1))
    fields = {
        "vocab_size": vocab_size,
        "width": width,
        "mlp_width": _shape(checkpoint, f"layers.0.{_GATE}.weight", 2)[0],
        "block_types": block_types,
    }
    if RECURRENT in block_types:
        # The RG-LRU gates are block-diagonal, one (d, d) block per head.
        layer = block_types.index(RECURRENT)
        num_heads, head_width, _ = _shape(checkpoint, f"layers.{layer}.{RG_LRU}.input_gate_weight", 3)
        fields.update(num_heads=num_heads, lru_width=num_heads * head_width)
    return fields


def _official_config(file: Path, found: dict, overrides: dict) -> Config:
    # Official checkpoints carry no config. What shapes cannot tell (window,
    # soft-cap, embedding scale) takes the RecurrentGemma values, Config's defaults.
    fields = found | overrides
    if "num_heads" not in fields:
        raise CheckpointError(f"{file}: no recurrent layer to infer the number of heads from; pass num_heads")
    fields.setdefault("lru_width", fields["width"])  # unused without recurrent layers
    try:
        return Config(**fields)
    except ValueError as error:
        raise CheckpointError(f"{file}: {error}") from error


def _hf_config(file: Path, hf_config: dict, found: dict, overrides: dict) -> Config:
    try:
        declared = Config.from_hf_dict(hf_config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{file}: {error}") from error
    found = found | {"num_layers": len(found["block_types"])}
    for field, key in SHAPE_FIELDS.items():
        if field in found and getattr(declared, field) != found[field]:
            raise CheckpointError(
                f"{file}: {key} disagrees with the tensors: config.json gives {field}={getattr(declared, field)!r}, "
                f"the tensor shapes give {field}={found[field]!r}"
            )
    try:
        return declared.replace(**overrides)
    except ValueError as error:
        raise CheckpointError(f"{file}: with overrides {overrides}: {error}") from error


def _config(checkpoint: Checkpoint, overrides: dict) -> Config:
    valid = [field.name for field in dataclasses.fields(Config)]
    unknown = sorted(overrides.keys() - set(valid))
    if unknown:
        raise CheckpointError(f"{checkpoint.path}: unknown config fields {unknown}; valid: {', '.join(valid)}")
    found = _shape_fields(checkpoint)
    if checkpoint.hf_config is None:
        return _official_config(checkpoint.path, found, overrides)
    return _hf_config(checkpoint.path / CONFIG_FILE, checkpoint.hf_config, found, overrides)


# Loading ---------------------------------------------------------------------


def _plan(checkpoint: Checkpoint, model: Griffin) -> dict[str, tuple[Stored, Fix]]:
    """Match every model tensor to a stored one, checking names and shapes before anything is read."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    formats = format_dtypes(model)  # quantized tensors must come in their format's dtype
    plan, used, problems = {}, set(), []

    def where(stored: Stored) -> str:
        return "" if stored.file == checkpoint.path else f" (in {stored.file.name})"

    for ours, shape in expected.items():
        theirs, fix = checkpoint.naming.name(ours)
        used.add(theirs)
        stored = checkpoint.tensors.get(theirs)
        if stored is None:
            problems.append(f"missing tensor {theirs}")
        elif _fixed_shape(stored, fix) != shape:
            problems.append(
                f"shape mismatch for {theirs}{where(stored)}: file has {stored.shape}, model needs {shape} for {ours}"
            )
        elif ours in formats and stored.dtype != formats[ours]:
            problems.append(
                f"dtype mismatch for {theirs}{where(stored)}: file has {stored.dtype}, the quantized format "
                f"stores {formats[ours]}"
            )
        else:
            plan[ours] = (stored, fix)
    problems += [
        f"unexpected tensor {name}{where(stored)}" for name, stored in checkpoint.tensors.items() if name not in used
    ]
    head, embedding = checkpoint.tied_head, expected.get(EMBEDDING_WEIGHT)
    if head is not None and embedding is None:
        problems.append(f"unexpected tensor {TIED_HEAD}: the output layer is the quantized embedding")
    elif head is not None and head.shape != embedding:
        problems.append(f"shape mismatch for {TIED_HEAD}: file has {head.shape}, the tied embedding has {embedding}")
    problems = list(dict.fromkeys(problems))  # the two MLP branches share a tensor
    if problems:
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise CheckpointError(f"{checkpoint.path}: " + "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + more)
    return plan


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; try bfloat16, float16 or float32")
        return getattr(torch, dtype)
    return dtype


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: Callable | None = None,
    **config_overrides,
) -> Griffin:
    """Load a Hugging Face directory, an official PyTorch .pt file or an official Orbax/Flax directory.

    `dtype` defaults to the checkpoint's own; in a quantized checkpoint it is
    the dtype of the parts kept in float. `quantize` (8 or 4) quantizes a
    float checkpoint while loading it, tensor by tensor (`group_size` for
    int4), as `rgemma.quantize.quantize_model` would after loading.
    `progress`, if given, wraps the iteration over tensors, as
    tqdm(iterable, total=n) does. `config_overrides` are Config fields, e.g.
    `attention_window=1024`; official checkpoints need them for what tensor
    shapes cannot tell, which otherwise takes the RecurrentGemma values.
    """
    path = Path(path)
    dtype = _torch_dtype(dtype)
    if quantize is not None:
        check_format(quantize, group_size)
    with contextlib.ExitStack() as files:
        checkpoint = _open(path, files)
        # On the meta device nothing is allocated; load_state_dict(assign=True)
        # then takes the tensors, dtype included, as they are.
        model = Griffin(_config(checkpoint, config_overrides), device="meta")
        if checkpoint.quantization is not None:
            if quantize is not None:
                raise CheckpointError(
                    f"{path}: is already quantized ({checkpoint.quantization.bits} bits); load it as it is, "
                    "or quantize its float original (errors would add up)"
                )
            try:
                checkpoint.quantization.apply(model)
            except ValueError as error:
                raise CheckpointError(f"{path / CONFIG_FILE}: {error}") from error
        plan = _plan(checkpoint, model)
        if checkpoint.tied_head is not None and not torch.equal(
            checkpoint.tied_head.read(), plan[EMBEDDING_WEIGHT][0].read()
        ):
            raise CheckpointError(f"{path}: {TIED_HEAD} differs from the embedding; Griffin ties the two")
        # The checkpoint's dtype: its embedding's, or a quantized one's norm's.
        reference = plan.get(EMBEDDING_WEIGHT, plan[FINAL_NORM_WEIGHT])[0]
        dtype = dtype or reference.dtype or reference.read().dtype
        formats = format_dtypes(model)
        to_quantize = set(quantizable(model)) if quantize is not None else set()
        # One tensor at a time: a tensor already in the right dtype and device
        # stays a view of the file; any other is converted, or quantized, on its own.
        state = {}
        items = plan.items() if progress is None else progress(plan.items(), total=len(plan))
        for name, (stored, fix) in items:
            tensor = fix(stored.read())
            module = name.removesuffix(".weight")
            if module not in to_quantize:
                # Quantizing at load reads every weight of the file once: a view of
                # it kept here would keep all those pages resident beside the
                # quantized copy, so what stays float (norms, conv, RG-LRU; small) is copied.
                state[name] = tensor.to(device=device, dtype=formats.get(name, dtype), copy=bool(to_quantize))
                continue
            try:
                parts = quantize_weight(tensor.to(dtype), quantize, group_size)
            except ValueError as error:
                raise CheckpointError(
                    f"{stored.file}: {module} cannot be stored in {quantize} bits: its weight {error}"
                ) from error
            state.update({f"{module}.{part}": t.to(device) for part, t in parts.items()})
        if quantize is not None:
            quantize_model(model, quantize, group_size)  # on the meta device: empty quantized modules
        model.to(dtype)  # on the meta device: tells quantized modules the dtype of their float outputs
    model.load_state_dict(state, strict=True, assign=True)
    return model


# Saving ----------------------------------------------------------------------


def _refuse_existing(out_dir: Path):
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: already exists and is not an empty directory; will not overwrite it")


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of names, each at most max_shard_bytes unless one tensor alone is larger."""
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_hf(model: Griffin, directory: Path, max_shard_bytes: int):
    # The `model.` prefix is what transformers' RecurrentGemmaForCausalLM expects;
    # lm_head is tied to the embedding and not stored.
    tensors = {f"{HF_PREFIX}{name}": t for name, t in model.state_dict().items()}
    # A quantized model records its format in every file, so no file is read by guesswork.
    record = Quantization.of(model)
    record = None if record is None else record.to_json(prefix=HF_PREFIX)
    header = {"format": "pt"} if record is None else {"format": "pt", QUANTIZATION_KEY: json.dumps(record)}
    shards = _shards(tensors, max_shard_bytes)
    files = (
        [WEIGHTS_FILE] if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    for file, names in zip(files, shards):
        # One shard at a time is made contiguous on the CPU (transposed views are copied).
        shard = {name: tensors[name].cpu().contiguous() for name in names}
        save_file(shard, directory / file, metadata=header)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file for file, names in zip(files, shards) for name in names},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = model.config.to_hf_dict() | {"dtype": str(model.dtype).removeprefix("torch.")}
    if record is not None:
        hf_config[QUANTIZATION_KEY] = record
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def save_model(model: Griffin, out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` as a Hugging Face directory (config.json and safetensors), atomically.

    `out_dir` must not exist or be empty; tensors are split into shards of at
    most `max_shard_bytes`, with model.safetensors.index.json, when they do not fit one.
    """
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    _write_directory(model, out_dir, max_shard_bytes)
    return out_dir


def _write_directory(model: Griffin, out_dir: Path, max_shard_bytes: int, copies: list[Path] = ()) -> None:
    """The Hugging Face directory of `model`, with `copies` of other files, made atomically."""
    if not max_shard_bytes > 0:
        raise ValueError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    try:
        with atomic_directory(out_dir) as staging:
            _write_hf(model, staging, max_shard_bytes)
            for file in copies:
                shutil.copyfile(file, staging / file.name)
    except SafetensorError as error:  # how safetensors reports a full disk (os error 28)
        raise CheckpointError(f"{out_dir}: cannot write the checkpoint: {_first_line(error)}") from error
    except OSError as error:  # its own message names the hidden staging directory, not the one asked for
        raise CheckpointError(f"{out_dir}: cannot write the checkpoint: {error.strerror or error}") from error


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    **overrides,
) -> Path:
    """Rewrite any checkpoint `load_model` reads as a Hugging Face directory.

    Tokenizer files found with the source (in a Hugging Face directory, or
    beside an official file or directory, as the official releases ship them) are copied too.
    `overrides` go to `load_model`: config fields, and `quantize=8|4`,
    `group_size`, `progress` to write a quantized checkpoint.
    """
    src, dst = Path(src), Path(dst)
    _refuse_existing(dst)  # before the work of loading
    model = load_model(src, dtype=dtype, **overrides)
    tokenizer_dir = src if (src / CONFIG_FILE).is_file() else src.parent
    copies = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    _write_directory(model, dst, max_shard_bytes, copies)
    return dst
