"""What every backend is: the options it decides from, and the plain path it falls back to."""

from __future__ import annotations

import dataclasses
import os

import torch

from rgemma.backends.native import chosen_level
from rgemma.model import Griffin
from rgemma.state import State


def _environment_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclasses.dataclass(frozen=True)
class Options:
    """Choices a backend would otherwise make from the hardware; None: the environment's, else the hardware's."""

    native_kernels: bool | None = None  # the native CPU kernels, where they build
    native_bf16: bool | None = None  # the CPU computes bf16 GEMMs natively (AVX512-BF16, AMX)
    cuda_graphs: bool | None = None  # decode steps replayed from CUDA graphs
    cpu_level: str | None = None  # the native kernels' instruction-set level (native.LEVELS), at most the CPU's

    def resolved(self) -> Options:
        """Every None replaced by the environment's setting, and otherwise the hardware's."""
        native_kernels = _pick(self.native_kernels, "RGEMMA_NATIVE_KERNELS", True)
        native_bf16 = _pick(self.native_bf16, "RGEMMA_CPU_BF16", None)
        if native_bf16 is None:
            native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return Options(native_kernels, native_bf16, _pick(self.cuda_graphs, "RGEMMA_CUDA_GRAPHS", True),
                       chosen_level(self.cpu_level))


def _pick(value: bool | None, variable: str, default: bool | None) -> bool | None:
    if value is not None:
        return value
    from_environment = _environment_flag(variable)
    return default if from_environment is None else from_environment


class Backend:
    """Serves a prepared model: `step(tokens, state)` is its decode step, `describe()` says how it computes.

    This base class is the plain path, valid on every device: the model's own forward.
    """

    name = "plain"

    def __init__(self, model: Griffin, options: Options):
        self.model = model
        self.options = options

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (B, 1) at each row's next position -> (next-token logits (B, V) float32, the state to pass next).

        The state passed in is updated in place unless the returned one is another object (a CUDA graph's
        buffers): always continue from the returned state.
        """
        logits, state = self.model(tokens, state=state)
        return logits[:, -1], state

    @property
    def decode_path(self) -> str:
        """How a decode step of the model as it is now runs: "plain" (its modules' forward), "native", "graphs"."""
        return "plain"

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": str(self.model.device),
            "weights": str(self.model.dtype).removeprefix("torch."),
            "activations": str(self.model.activation_dtype).removeprefix("torch."),
            "decode": self.decode_path,
        }
