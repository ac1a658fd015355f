"""The native kernels' instruction-set levels as test parameters: each level this CPU runs, and each it lacks
skipped with the flags it lacks named (rgemma/backends/native.py)."""

import pytest
import torch

from rgemma.backends import native

LEVELS = [
    pytest.param(level, id=level, marks=pytest.mark.skipif(
        bool(native.missing_flags(level)), reason=f"level {level}: this CPU lacks {' '.join(native.missing_flags(level))}"))
    for level in native.LEVELS
]


def step_tolerance(dtype: torch.dtype, level: str | None = None) -> float:
    """The relative error a native decode step may have against the float32 forward at `level` (default: the
    process's): 1e-5, or 3e-2 for bf16 weights where they take bf16 dot products with the activations rounded
    to bf16 (3e-3 to 1e-2 measured on the tests' random models; a misread weight is off by the whole output)."""
    level = level or native.chosen_level()
    return 3e-2 if dtype == torch.bfloat16 and level is not None and native.LEVELS[level].bf16_dot else 1e-5
