"""Griffin configuration: named presets and the Hugging Face config.json translation."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """The (recurrent, recurrent, attention) temporal-mixing pattern of Griffin."""
    return tuple(itertools.islice(itertools.cycle((RECURRENT, RECURRENT, ATTENTION)), num_layers))


@functools.cache
def _bfloat16_sqrt(width: int) -> float:
    # Once per width: it is read at every decode step. torch is imported here, not above, so that
    # the command line reads presets and settings without loading it.
    import torch

    return torch.tensor(math.sqrt(width), dtype=torch.bfloat16).item()


# Bounds that keep a hostile or mistyped config from asking for absurd allocations (a window of 2**40
# is terabytes of state; 10**12 layers never finish building) before any tensor is read. They are
# far above any published Griffin (2b: window 2048, 26 layers; vocabularies of 256k).
MAX_SIZE = 2**31 - 1  # token ids and sizes fit int32
MAX_WINDOW = 2**20
MAX_LAYERS = 4096
MAX_CONV_WIDTH = 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_float(value):
    """A JSON number as a float (JSON writes 10000 and 10000.0 alike); anything else as it is, for Config to refuse."""
    return float(value) if _is_number(value) else value


def _int_in(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: _is_int(value) and low <= value <= high), f"must be an integer in [{low}, {high}]"


# Each field's type and range: (check, what the error says it must be).
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "vocab_size": _int_in(1, MAX_SIZE),
    "width": _int_in(1, MAX_SIZE),
    "mlp_width": _int_in(1, MAX_SIZE),
    "num_heads": _int_in(1, MAX_SIZE),
    "lru_width": _int_in(1, MAX_SIZE),
    "attention_window": _int_in(1, MAX_WINDOW),
    "conv_width": _int_in(2, MAX_CONV_WIDTH),  # the conv's state holds conv_width - 1 >= 1 inputs
    "logits_soft_cap": (lambda value: _is_number(value) and value >= 0, "must be a finite number >= 0 (0: no cap)"),
    "embeddings_scale_by_sqrt_dim": (lambda value: isinstance(value, bool), "must be true or false"),
    # A negative base gives NaN frequencies, and eps 0 NaN norms of a zero input.
    "rope_base": (lambda value: _is_number(value) and value > 0, "must be a finite number > 0"),
    "norm_eps": (lambda value: _is_number(value) and 0 < value < 1, "must be a finite number in (0, 1)"),
}


class FieldError(ValueError):
    """A config field of the wrong type or out of range; `field` names it, so config.json can be named too."""

    def __init__(self, field: str, requirement: str, value: Any):
        self.field, self.requirement, self.value = field, requirement, value
        super().__init__(f"config field {field} {requirement}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    width: int
    mlp_width: int  # per branch (gate and up); HF's intermediate_size is twice this
    num_heads: int
    lru_width: int
    block_types: tuple[str, ...]
    attention_window: int = 2048  # a query sees this many earlier keys plus itself
    logits_soft_cap: float = 30.0  # 0 disables the cap
    embeddings_scale_by_sqrt_dim: bool = True
    conv_width: int = 4
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "block_types", tuple(self.block_types))
        for name, (check, requirement) in FIELD_RULES.items():
            if not check(getattr(self, name)):
                raise FieldError(name, requirement, getattr(self, name))
        if not self.block_types:
            raise ValueError("config field block_types is empty")
        if self.num_layers > MAX_LAYERS:
            raise FieldError("block_types", f"may hold at most {MAX_LAYERS} layers", f"{self.num_layers} layers")
        unknown = sorted({str(t) for t in self.block_types} - set(BLOCK_TYPES))
        if unknown:
            raise ValueError(f"config field block_types has unknown entries {unknown}; valid: {list(BLOCK_TYPES)}")
        if self.width % self.num_heads or self.lru_width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide width={self.width} and lru_width={self.lru_width}"
            )
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 (RoPE on half of it)")

    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def embedding_scale(self) -> float:
        # The official code multiplies by sqrt(width) cast to bfloat16 (2b: 50.5, not 50.596).
        if not self.embeddings_scale_by_sqrt_dim:
            return 1.0
        return _bfloat16_sqrt(self.width)

    @property
    def final_init_variance_scale(self) -> float:
        """Variance scale of each block's last linear, so the residual sum stays O(1) at init."""
        return 2.0 / self.num_layers

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    # Hugging Face config.json ------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["RecurrentGemmaForCausalLM"],
            "model_type": "recurrent_gemma",
            "vocab_size": self.vocab_size,
            "hidden_size": self.width,
            "intermediate_size": 2 * self.mlp_width,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "lru_width": self.lru_width,
            "num_hidden_layers": self.num_layers,
            "block_types": list(self.block_types),
            "attention_window_size": self.attention_window,
            "logits_soft_cap": self.logits_soft_cap,
            "embeddings_scale_by_sqrt_dim": self.embeddings_scale_by_sqrt_dim,
            "conv1d_width": self.conv_width,
            "rope_theta": self.rope_base,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": self.norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "final_w_init_variance_scale": self.final_init_variance_scale,
            "w_init_variance_scale": 0.01,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Config:
        """The config of a config.json; an error names the key that is missing, mistyped or out of range."""
        if hf.get("model_type", "recurrent_gemma") != "recurrent_gemma":
            raise ValueError(f"config.json has model_type {hf['model_type']!r}, expected 'recurrent_gemma'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        # Read before use: these three are computed with, the others are checked by Config itself.
        for key, high in (("intermediate_size", MAX_SIZE), ("num_hidden_layers", MAX_LAYERS),
                          ("num_key_value_heads", MAX_SIZE)):
            value = hf.get(key, 1)
            if not _is_int(value) or not 1 <= value <= high:
                raise ValueError(f"config.json {key} must be an integer in [1, {high}], got {value!r}")
        if hf["intermediate_size"] % 2:
            raise ValueError(f"config.json intermediate_size={hf['intermediate_size']} must be even (two MLP branches)")
        kv_heads = hf.get("num_key_value_heads", 1)
        if kv_heads != 1:
            raise ValueError(f"config.json num_key_value_heads={kv_heads}: Griffin attention is multi-query (1)")
        # The published 2B config spells the pattern `_block_types`, the 9B `block_types`.
        pattern_key = "block_types" if "block_types" in hf else "_block_types"
        pattern = hf.get(pattern_key)
        if pattern is None:
            raise ValueError("config.json lacks block_types (or _block_types)")
        if not isinstance(pattern, list) or not pattern or not all(isinstance(t, str) for t in pattern):
            raise ValueError(f"config.json {pattern_key} must be a non-empty list of block types {list(BLOCK_TYPES)}")
        # HF repeats a short pattern over the layers.
        block_types = tuple(itertools.islice(itertools.cycle(pattern), hf["num_hidden_layers"]))
        rope = hf.get("rope_parameters")
        rope_base = hf.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10_000.0
        soft_cap = hf.get("logits_soft_cap")
        fields = dict(
            vocab_size=hf["vocab_size"],
            width=hf["hidden_size"],
            mlp_width=hf["intermediate_size"] // 2,
            num_heads=hf["num_attention_heads"],
            lru_width=hf.get("lru_width") or hf["hidden_size"],
            block_types=block_types,
            attention_window=hf.get("attention_window_size", 2048),
            logits_soft_cap=_as_float(0.0 if soft_cap is None else soft_cap),
            embeddings_scale_by_sqrt_dim=hf.get("embeddings_scale_by_sqrt_dim", True),
            conv_width=hf.get("conv1d_width", 4),
            rope_base=_as_float(rope_base),
            norm_eps=_as_float(hf.get("rms_norm_eps", 1e-6)),
        )
        try:
            return cls(**fields)
        except FieldError as error:
            raise ValueError(f"config.json {HF_KEYS[error.field]} {error.requirement}, got {error.value!r}") from None


# The config.json key of each field that from_hf_dict reads.
HF_KEYS = {
    "vocab_size": "vocab_size", "width": "hidden_size", "mlp_width": "intermediate_size",
    "num_heads": "num_attention_heads", "lru_width": "lru_width", "block_types": "num_hidden_layers",
    "attention_window": "attention_window_size", "logits_soft_cap": "logits_soft_cap",
    "embeddings_scale_by_sqrt_dim": "embeddings_scale_by_sqrt_dim", "conv_width": "conv1d_width",
    "rope_base": "rope_theta", "norm_eps": "rms_norm_eps",
}


PRESETS: dict[str, Config] = {
    "2b": Config(
        vocab_size=256_000, width=2560, mlp_width=3 * 2560, num_heads=10, lru_width=2560,
        block_types=griffin_pattern(26),
    ),
    "9b": Config(
        vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=16, lru_width=4096,
        block_types=griffin_pattern(38),
    ),
    "griffin-7b": Config(
        vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=griffin_pattern(32), attention_window=1024, logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    ),
    "hawk-7b": Config(
        vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=(RECURRENT,) * 32, attention_window=1024, logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    ),
    # Tiny configurations for tests and experiments; the small window makes
    # sequences longer than the window cheap to exercise.
    "tiny": Config(
        vocab_size=512, width=64, mlp_width=192, num_heads=4, lru_width=64,
        block_types=griffin_pattern(3), attention_window=16,
    ),
    "tiny-wide-lru": Config(
        vocab_size=512, width=64, mlp_width=128, num_heads=2, lru_width=96,
        block_types=griffin_pattern(6), attention_window=8,
    ),
}
