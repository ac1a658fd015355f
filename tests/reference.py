"""Reference models (the official `recurrentgemma` package and `transformers`) with random weights."""

import torch
from recurrentgemma.torch import griffin as official_griffin

from rgemma import Config
from rgemma.bench import official_config
from conftest import perturb_


def official_model(config: Config, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = official_griffin.Griffin(official_config(config), gradient_checkpointing=False, dtype=dtype)
    return perturb_(model, seed).eval()


def transformers_model(config: Config, seed: int = 0):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**config.to_hf_dict()))
    return perturb_(model, seed).eval()
