"""The native CPU kernels (csrc/cpu_kernels.cpp): built with torch's extension builder at first use, and cached.

Where they cannot be built or run, every product takes the plain PyTorch
path, which computes the same function: the tests compare the two.

RGEMMA_SANITIZE=address builds them with AddressSanitizer (into a cache
directory of their own), to check that no input makes them read or write out
of bounds. Python itself is not built with it, so the ASan runtime must be
loaded first, with libstdc++ beside it (else ASan cannot intercept the C++
exceptions by which the kernels refuse bad input, and aborts):

    RGEMMA_SANITIZE=address ASAN_OPTIONS=detect_leaks=0 RGEMMA_FUZZ_EXAMPLES=2000 \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        python -m pytest -n 0 -s -p no:cacheprovider tests/test_hostile_input.py tests/test_decode.py

(-s: pytest's capture would swallow ASan's report when it aborts the process.)
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent.parent / "csrc" / "cpu_kernels.cpp"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
SANITIZE_FLAGS = {"address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]}


def _sanitize_flags() -> list[str]:
    """RGEMMA_SANITIZE's compiler and linker flags (none when unset)."""
    name = os.environ.get("RGEMMA_SANITIZE", "")
    if name and name not in SANITIZE_FLAGS:
        raise ValueError(f"RGEMMA_SANITIZE={name!r}: valid values are {', '.join(SANITIZE_FLAGS)}")
    return SANITIZE_FLAGS.get(name, [])


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    flags = COMPILE_FLAGS + _sanitize_flags()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    return base / "rgemma" / "kernels" / f"torch-{torch.__version__}-{digest}"


def cpu_supported() -> bool:
    """The CPU runs AVX2 code (torch reports AVX2 or AVX512 capability)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled CPU kernels, built on first use; None where they cannot be."""
    if not cpu_supported():
        return None
    from torch.utils import cpp_extension

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print("rgemma: compiling the CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name="rgemma_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=COMPILE_FLAGS + _sanitize_flags(),
            extra_ldflags=["-fopenmp"] + _sanitize_flags(),
            build_directory=str(build_dir),
        )
    except Exception as error:  # a missing compiler or ninja: fall back, but say so once
        message = str(error).strip().splitlines()
        warnings.warn(
            f"rgemma: CPU kernels unavailable ({message[-1] if message else type(error).__name__}); "
            "decoding uses plain PyTorch, which is slower",
            stacklevel=2,
        )
        return None
