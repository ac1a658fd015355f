"""The native kernels' instruction-set levels as test parameters: each level this CPU runs, and each it lacks
skipped with the flags it lacks named (rgemma/backends/native.py)."""

import pytest

from rgemma.backends import native

LEVELS = [
    pytest.param(level, id=level, marks=pytest.mark.skipif(
        bool(native.missing_flags(level)), reason=f"level {level}: this CPU lacks {' '.join(native.missing_flags(level))}"))
    for level in native.LEVELS
]
