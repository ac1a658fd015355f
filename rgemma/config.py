"""Griffin configuration: named presets and the Hugging Face config.json translation."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
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
        for name in ("vocab_size", "width", "mlp_width", "num_heads", "lru_width", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if not self.block_types:
            raise ValueError("config field block_types is empty")
        unknown = sorted(set(self.block_types) - set(BLOCK_TYPES))
        if unknown:
            raise ValueError(f"config field block_types has unknown entries {unknown}; valid: {list(BLOCK_TYPES)}")
        if self.width % self.num_heads or self.lru_width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide width={self.width} and lru_width={self.lru_width}"
            )
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 (RoPE on half of it)")
        if self.attention_window <= 0:
            raise ValueError(f"config field attention_window must be positive, got {self.attention_window}")

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
        if hf.get("model_type", "recurrent_gemma") != "recurrent_gemma":
            raise ValueError(f"config.json has model_type {hf['model_type']!r}, expected 'recurrent_gemma'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        if hf["intermediate_size"] % 2:
            raise ValueError(f"config.json intermediate_size={hf['intermediate_size']} must be even (two MLP branches)")
        kv_heads = hf.get("num_key_value_heads", 1)
        if kv_heads != 1:
            raise ValueError(f"config.json num_key_value_heads={kv_heads}: Griffin attention is multi-query (1)")
        # The published 2B config spells the pattern `_block_types`, the 9B `block_types`.
        pattern = hf.get("block_types", hf.get("_block_types"))
        if pattern is None:
            raise ValueError("config.json lacks block_types (or _block_types)")
        num_layers = hf["num_hidden_layers"]
        # HF repeats a short pattern over the layers.
        block_types = tuple(itertools.islice(itertools.cycle(pattern), num_layers))
        rope_base = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
        return cls(
            vocab_size=hf["vocab_size"],
            width=hf["hidden_size"],
            mlp_width=hf["intermediate_size"] // 2,
            num_heads=hf["num_attention_heads"],
            lru_width=hf.get("lru_width") or hf["hidden_size"],
            block_types=block_types,
            attention_window=hf.get("attention_window_size", 2048),
            logits_soft_cap=float(hf.get("logits_soft_cap") or 0.0),
            embeddings_scale_by_sqrt_dim=hf.get("embeddings_scale_by_sqrt_dim", True),
            conv_width=hf.get("conv1d_width", 4),
            rope_base=float(rope_base),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
        )


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
