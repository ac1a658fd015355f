import pytest
import torch
from torch import nn

from rgemma import Config, Griffin


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised norms and biases take part in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((scale * noise).to(param.dtype))
    return module


@pytest.fixture
def tiny():
    """A tiny Griffin (window 8, lru wider than the model) with every parameter random."""
    torch.manual_seed(0)
    return perturb_(Griffin(Config.preset("tiny-wide-lru"))).eval()


@pytest.fixture
def one_thread():
    """Tiny models are all thread hand-offs, which cost most on a busy machine (test_kernels uses threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LowRankAdapter(nn.Module):
    """What a LoRA wrapper looks like to the backend: a module of a kind it does not know, keeping the linear."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.T.to(x.dtype) @ self.up.T.to(x.dtype)
