"""Reference models (the official `recurrentgemma` package and `transformers`) with random weights."""

import torch
from recurrentgemma import common
from recurrentgemma.torch import griffin as official_griffin

from rgemma import Config
from conftest import perturb_


def official_config(config: Config) -> common.GriffinConfig:
    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads,
        lru_width=config.lru_width,
        block_types=tuple(kinds[b] for b in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window,
        logits_soft_cap=config.logits_soft_cap,
    )


def official_model(config: Config, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = official_griffin.Griffin(official_config(config), gradient_checkpointing=False, dtype=dtype)
    return perturb_(model, seed).eval()


def transformers_model(config: Config, seed: int = 0):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**config.to_hf_dict()))
    return perturb_(model, seed).eval()
