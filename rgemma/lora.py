"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on a Griffin's linears and on its RG-LRU gates.

An adapter adds a low-rank update `scaling * B @ A` (rank r, scaling =
alpha / r) to a frozen matrix; B starts at zero, so a new adapter leaves the
model's outputs as they were. Targets are found through the model's weight
table (rgemma/model.py): every linear of every block and the two RG-LRU gate
matrices of every recurrent block.

- A linear is wrapped by `LoraLinear`, which keeps the frozen linear as
  `.base` and adds B(A(dropout(x))): the update never becomes a full matrix
  in training. The wrapper is a module kind the CPU backend's native decoder
  does not know, so decoding with an adapter takes the plain path there.
- A gate `(H, d, d)` is block-diagonal: one d x d matrix per head, read as
  `x_h @ W[h]`. It gets per-head factors A (H, r, d) and B (H, d, r), so the
  update `A[h]^T B[h]^T` stays inside each head's block, through a
  `torch.nn.utils.parametrize` parametrization (the gate weight the RG-LRU
  reads becomes W + update). Dropout applies to the linears' inputs only: a
  parametrization changes the weight, not the gate's input.

Adapters are saved as PEFT saves them: `adapter_config.json` and
`adapter_model.safetensors`, with tensor names of the Hugging Face model
(`base_model.model.model.layers.{i}.<path>.lora_A.weight`), so PEFT loads
the linears' adapters onto transformers' RecurrentGemma. PEFT has no
block-diagonal gate adapter: the gate factors are extra tensors with the
same naming (`...rg_lru.input_gate_weight.lora_A.weight`, (H, r, d)) and are
listed under `rgemma_gate_targets` in the config.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from rgemma._io import atomic_directory
from rgemma.config import RECURRENT, Config
from rgemma.model import RG_LRU, RG_LRU_GATES, Griffin, Linear, block_linears

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT wraps transformers' RecurrentGemmaForCausalLM, whose network is its `model.` attribute.
PEFT_PREFIX = "base_model.model.model."
GATE_TARGETS_KEY = "rgemma_gate_targets"
FACTORS = ("lora_A", "lora_B")


def default_targets(config: Config) -> tuple[str, ...]:
    """Every block matrix: each kind of linear and both RG-LRU gates, by their last name."""
    names = {path.rsplit(".", 1)[-1] for kind in set(config.block_types) for path in block_linears(kind)}
    return tuple(sorted(names)) + (RG_LRU_GATES if RECURRENT in config.block_types else ())


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # name patterns; None: default_targets

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ValueError("no LoRA targets given")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def candidate_paths(config: Config) -> list[str]:
    """What can carry an adapter: each block's linears (module paths) and RG-LRU gates (parameter paths)."""
    paths = []
    for i, kind in enumerate(config.block_types):
        paths += [f"layers.{i}.{path}" for path in block_linears(kind)]
        if kind == RECURRENT:
            paths += [f"layers.{i}.{RG_LRU}.{gate}" for gate in RG_LRU_GATES]
    return paths


def target_paths(config: Config, patterns: tuple[str, ...]) -> list[str]:
    """The candidate paths that any pattern matches, whole (`layers.2.*`) or as a dotted suffix (`q_proj`,
    `mlp_block.*`); a pattern that matches nothing is an error."""
    candidates = candidate_paths(config)
    chosen = set()
    for pattern in patterns:
        matched = {p for p in candidates if fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, "*." + pattern)}
        if not matched:
            kinds = sorted({p.split(".", 2)[2] for p in candidates})
            raise ValueError(f"LoRA target {pattern!r} matches nothing in the model; its matrices: {', '.join(kinds)}")
        chosen |= matched
    return [p for p in candidates if p in chosen]


class LoraLinear(nn.Module):
    """A frozen linear plus scaling * B(A(dropout(x))), computed in the activations' dtype."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float, device: torch.device):
        super().__init__()
        self.base = base  # a Linear, or a quantized one (rgemma/quantize.py)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        factory = {"device": device, "dtype": torch.float32}
        self.lora_A = Linear(base.in_features, rank, bias=False, **factory)  # nn.Linear's init: kaiming uniform
        self.lora_B = Linear(rank, base.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)

    def delta(self) -> torch.Tensor:
        """The update to base.weight (out, in), float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


class GateLora(nn.Module):
    """Parametrization of a block-diagonal gate W (H, d, d), read as x_h @ W[h]: W + scaling * A[h]^T B[h]^T."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float):
        super().__init__()
        heads, d_in, d_out = weight.shape
        self.scaling = scaling
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(heads, rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(heads, d_out, rank, **factory))
        bound = 1.0 / math.sqrt(d_in)  # as nn.Linear(d_in, rank) initialises each head's A
        nn.init.uniform_(self.lora_A, -bound, bound)

    def delta(self) -> torch.Tensor:
        return self.scaling * torch.einsum("hri,hor->hio", self.lora_A, self.lora_B)  # (H, d_in, d_out)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def add_lora(model: Griffin, settings: LoraSettings) -> list[str]:
    """Freeze the model and put new adapters on the targets, in place; returns the adapted paths."""
    paths = target_paths(model.config, settings.targets or default_targets(model.config))
    model.requires_grad_(False)
    for path in paths:
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if name in RG_LRU_GATES:
            gate = GateLora(getattr(parent, name), settings.rank, settings.scaling)
            parametrize.register_parametrization(parent, name, gate, unsafe=True)
        else:
            adapter = LoraLinear(getattr(parent, name), settings.rank, settings.scaling, settings.dropout, model.device)
            setattr(parent, name, adapter)
    return paths


def _adapters(model: Griffin) -> dict[str, nn.Module]:
    """Adapted path -> its LoraLinear or GateLora."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            found[path] = module
        elif parametrize.is_parametrized(module):
            for name, chain in module.parametrizations.items():
                found.update({f"{path}.{name}": p for p in chain if isinstance(p, GateLora)})
    return found


# A gate adapter's factors as named_parameters() names them, under the parametrization of the gate.
_GATE_FACTOR = re.compile(r"(.+)\.parametrizations\.(\w+)\.\d+\.(lora_[AB])")


def peft_name(name: str) -> str | None:
    """The PEFT file's name of an adapter factor named as in named_parameters() (None: not a factor)."""
    gate = _GATE_FACTOR.fullmatch(name)
    if gate:
        return f"{PEFT_PREFIX}{gate[1]}.{gate[2]}.{gate[3]}.weight"
    if name.endswith((".lora_A.weight", ".lora_B.weight")):
        return PEFT_PREFIX + name
    return None


def adapter_tensors(model: Griffin) -> dict[str, torch.Tensor]:
    """The adapters' factors, by the names PEFT gives them in adapter_model.safetensors."""
    named = ((peft_name(name), p) for name, p in model.named_parameters())
    return {name: p for name, p in named if name is not None}


def adapter_parameters(model: Griffin) -> list[nn.Parameter]:
    return list(adapter_tensors(model).values())


def merge_lora(model: Griffin) -> Griffin:
    """Fold every adapter into the weight it adapts, in place (in float32, then the weight's dtype);
    the model is then a plain Griffin again, all of its parameters trainable.

    Merged weights are new tensors: a loaded model's weights may be read-only views of its files.
    """
    for path, adapter in _adapters(model).items():
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if isinstance(adapter, LoraLinear):
            if not isinstance(adapter.base, Linear):
                raise ValueError(f"{path} is quantized: merge the adapter into the float model, then quantize")
            setattr(parent, name, adapter.base)
            parent, name = adapter.base, "weight"
        else:
            parametrize.remove_parametrizations(parent, name, leave_parametrized=False)
        weight = getattr(parent, name)
        with torch.no_grad():
            merged = (weight.float() + adapter.delta()).to(weight.dtype)
        setattr(parent, name, nn.Parameter(merged))
    model.requires_grad_(True)
    return model


def save_adapter(tensors: dict[str, torch.Tensor], settings: LoraSettings, directory: str | os.PathLike,
                 base_model: str | None = None) -> Path:
    """Write adapter factors (as adapter_tensors names them) as PEFT does, replacing `directory` atomically."""
    directory = Path(directory)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    adapted = [name.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] for name in tensors if ".lora_A." in name]
    gates = sorted(p for p in adapted if p.rsplit(".", 1)[-1] in RG_LRU_GATES)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        # The linears by full path, so PEFT adapts exactly these.
        "target_modules": sorted(set(adapted) - set(gates)),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "inference_mode": True, "init_lora_weights": True,
        GATE_TARGETS_KEY: gates,
    }
    with atomic_directory(directory, replace=True) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_settings(directory: str | os.PathLike) -> tuple[LoraSettings, list[str]]:
    """The settings of a saved adapter and the paths it adapts."""
    file = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory}: not an adapter directory (no {ADAPTER_CONFIG})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: cannot read it ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: not a LoRA adapter config (peft_type {config.get('peft_type')!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{file}: no {key!r}")
    if config.get("use_rslora") or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{file}: rslora, DoRA and fan_in_fan_out adapters are not supported")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    paths = targets + list(config.get(GATE_TARGETS_KEY, []))
    settings = LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(paths))
    return settings, paths


def load_adapter(model: Griffin, directory: str | os.PathLike) -> LoraSettings:
    """Put the adapters saved in `directory` on `model` (frozen), in place; every tensor's name and shape checked."""
    directory = Path(directory)
    settings, paths = read_adapter_settings(directory)
    candidates = set(candidate_paths(model.config))
    # PEFT's target_modules may be suffixes (`q_proj`) or full paths (`model.layers.0...q_proj`).
    patterns = tuple(p.removeprefix("model.") for p in paths)
    unknown = [p for p in patterns if p.startswith("layers.") and p not in candidates]
    if unknown:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: targets the model lacks: {', '.join(unknown[:5])}")
    add_lora(model, dataclasses.replace(settings, targets=patterns))
    expected = adapter_tensors(model)
    file = directory / ADAPTER_WEIGHTS
    try:
        with safe_open(file, framework="pt") as stored:
            names = set(stored.keys())
            missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
            if missing or extra:
                raise ValueError(f"{file}: tensors do not match the adapter config "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
            with torch.no_grad():
                for name, target in expected.items():
                    tensor = stored.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                                         f"the model needs {tuple(target.shape)}")
                    target.copy_(tensor)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{file}: cannot read it ({error})") from None
    return settings
