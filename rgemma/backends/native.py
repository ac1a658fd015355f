"""The native CPU kernels (csrc/cpu_kernels.cpp): one build per instruction-set level, chosen at run time, built
once per install and cached.

Levels: the same source compiled with more instruction sets each
(`#if defined(__AVX512F__)` and the like pick the code inside), so one
package serves every x86 CPU. The CPU's flags are read once per process
(/proc/cpuinfo: the kernel clears flags it does not let programs use, such
as AVX-512 without the OS saving its registers), and the best level they
allow is taken; RGEMMA_CPU_LEVEL (or Options.cpu_level) forces another.

Each level builds into a directory of its own, named by a digest of
everything that changes the binary (the source, the flags, the compiler and
its version, torch's version, install path and C++ ABI, Python's version and
include path): two environments on one machine each build once and never
rebuild each other's. A file lock makes processes started together wait for
one build instead of racing, and each directory counts its builds
(`build_count`), so a rebuild shows. `rgemma build-kernels` builds every
level this CPU runs, up front.

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

(-s: pytest's capture would swallow ASan's report when it aborts the process.
Build the sanitized kernels first, with the same variables and LD_PRELOAD in
front of `rgemma build-kernels` (it loads what it built): on a loaded machine
a build inside a test can outlast pytest's per-test timeout.)
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent.parent / "csrc" / "cpu_kernels.cpp"
COMMON_FLAGS = ["-O3", "-fopenmp"]
SANITIZE_FLAGS = {"address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]}
LEVEL_VARIABLE = "RGEMMA_CPU_LEVEL"


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    cpu_flags: tuple[str, ...]  # as /proc/cpuinfo names them; all needed
    compile_flags: tuple[str, ...]
    # bf16 weights take bf16 dot products with the activations rounded to bf16, as in the bf16 GEMMs of a
    # prefill on the same CPU (relative error about 3e-3 in a decode step's logits, against 1e-6 in float32).
    bf16_dot: bool = False


_AVX2 = Level("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"))
# Integer dot products (vpdpbusd) in the VEX encoding, on CPUs without AVX-512 (Intel since Alder Lake).
_AVX2_VNNI = Level("avx2-vnni", _AVX2.cpu_flags + ("avx_vnni",), _AVX2.compile_flags + ("-mavxvnni",))
_AVX512 = Level("avx512", _AVX2.cpu_flags + ("avx512f", "avx512bw", "avx512vl"),
                _AVX2.compile_flags + ("-mavx512f", "-mavx512bw", "-mavx512vl"))
# Integer dot products without bf16 ones (Intel Cascade Lake and Ice Lake).
_AVX512_VNNI = Level("avx512-vnni", _AVX512.cpu_flags + ("avx512_vnni",), _AVX512.compile_flags + ("-mavx512vnni",))
# Integer dot products and bf16 dot products (vdpbf16ps): AMD Zen 4, Intel Cooper Lake and Sapphire Rapids.
_AVX512_VNNI_BF16 = Level("avx512-vnni-bf16", _AVX512_VNNI.cpu_flags + ("avx512_bf16",),
                          _AVX512_VNNI.compile_flags + ("-mavx512bf16",), bf16_dot=True)
# Lowest first: a CPU takes the last level whose flags it has all of.
LEVELS = {level.name: level for level in (_AVX2, _AVX2_VNNI, _AVX512, _AVX512_VNNI, _AVX512_VNNI_BF16)}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags this CPU reports to programs, read once per process.

    From /proc/cpuinfo where there is one; elsewhere torch's capability
    string, which names only AVX2 or AVX512 (so the plain AVX-512 level at most).
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return frozenset({"AVX2": _AVX2.cpu_flags, "AVX512": _AVX512.cpu_flags}.get(capability, ()))


def machine_levels() -> list[str]:
    """The levels this CPU runs, lowest first."""
    return [name for name, level in LEVELS.items() if set(level.cpu_flags) <= cpu_flags()]


def missing_flags(level: str) -> list[str]:
    """The CPU flags `level` needs that this CPU lacks."""
    return [flag for flag in LEVELS[level].cpu_flags if flag not in cpu_flags()]


def chosen_level(forced: str | None = None) -> str | None:
    """`forced`, else RGEMMA_CPU_LEVEL, else the best level this CPU runs; None where it runs none.

    A level that is unknown, or that the CPU lacks, is an error: code built for it would stop on an illegal
    instruction.
    """
    source = "Options.cpu_level"
    if forced is None:
        forced, source = os.environ.get(LEVEL_VARIABLE) or None, LEVEL_VARIABLE
    if forced is None:
        levels = machine_levels()
        return levels[-1] if levels else None
    if forced not in LEVELS:
        raise ValueError(f"{source}={forced!r}: valid levels are {', '.join(LEVELS)}")
    if missing_flags(forced):
        raise ValueError(f"{source}={forced!r}: this CPU lacks {', '.join(missing_flags(forced))}")
    return forced


def _sanitize_flags() -> list[str]:
    """RGEMMA_SANITIZE's compiler and linker flags (none when unset)."""
    name = os.environ.get("RGEMMA_SANITIZE", "")
    if name and name not in SANITIZE_FLAGS:
        raise ValueError(f"RGEMMA_SANITIZE={name!r}: valid values are {', '.join(SANITIZE_FLAGS)}")
    return SANITIZE_FLAGS.get(name, [])


@functools.cache
def _compiler() -> str:
    """The compiler torch's builder will run, and its version: a new compiler is a new binary."""
    compiler = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        version = f"unavailable: {error}"
    return f"{compiler}\n{version}"


def build_key(sources: list[Path], compile_flags: list[str], link_flags: list[str],
              include_paths: list[str]) -> str:
    """A digest of everything that changes the binary built from `sources` in this environment."""
    from torch.utils import cpp_extension

    parts = [
        *(source.read_bytes() for source in sources), *compile_flags, "--", *link_flags, "--", *include_paths,
        *cpp_extension.include_paths(), torch.__version__, str(Path(torch.__file__).parent),
        str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.version, sysconfig.get_paths()["include"], _compiler(),
    ]
    return hashlib.sha256("\0".join(p if isinstance(p, str) else p.hex() for p in parts).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rgemma" / "kernels"


def build_count(build_dir: Path) -> int:
    """How many times the library in `build_dir` was built (0: never)."""
    counter = build_dir / "builds"
    return int(counter.read_text()) if counter.is_file() else 0


def _library_stamp(build_dir: Path, name: str) -> tuple[int, int] | None:
    library = build_dir / f"{name}.so"
    return (library.stat().st_mtime_ns, library.stat().st_ino) if library.is_file() else None


def build_extension(name: str, sources: list[Path], compile_flags: list[str], link_flags: list[str],
                    include_paths: tuple[str, ...] = (), root: Path | None = None,
                    is_python_module: bool = True) -> ModuleType | str:
    """Build (once per key) and load a torch C++ extension; concurrent callers wait for one build.

    The directory is root/<name>-<build_key>. An exclusive lock on a file
    beside it is held while torch's builder runs (the kernel drops it if the
    process dies, unlike torch's own lock file, which is removed there when
    a killed build left it); a library new or changed under that lock counts
    as a build.
    """
    from torch.utils import cpp_extension

    key = build_key(sources, compile_flags, link_flags, list(include_paths))
    build_dir = (root or cache_root()) / f"{name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # torch's builder waits, without end, while its own lock file exists; one left by a process killed
        # mid-build is stale, since our lock is the only way in.
        (build_dir / "lock").unlink(missing_ok=True)
        before = _library_stamp(build_dir, name)
        if before is None:
            print(f"rgemma: compiling {name} (once per install, about a minute)...", file=sys.stderr, flush=True)
        module = cpp_extension.load(
            name=name, sources=[str(s) for s in sources], extra_cflags=compile_flags, extra_ldflags=link_flags,
            extra_include_paths=list(include_paths), build_directory=str(build_dir),
            is_python_module=is_python_module,
        )
        if _library_stamp(build_dir, name) != before:
            (build_dir / "builds").write_text(f"{build_count(build_dir) + 1}\n")
    return module


def _level_build(level: str) -> tuple[str, list[str], list[str]]:
    """A level's module name and its compile and link flags."""
    sanitize = _sanitize_flags()
    name = "rgemma_cpu_kernels_" + level.replace("-", "_")
    if sanitize:
        name += "_" + os.environ["RGEMMA_SANITIZE"]
    return name, [*COMMON_FLAGS, *LEVELS[level].compile_flags, *sanitize], ["-fopenmp", *sanitize]


def level_build_dir(level: str) -> Path:
    """Where `level`'s kernels are (or will be) built in this environment."""
    name, compile_flags, link_flags = _level_build(level)
    return cache_root() / f"{name}-{build_key([SOURCE], compile_flags, link_flags, [])}"


def is_built(level: str) -> bool:
    name = _level_build(level)[0]
    return _library_stamp(level_build_dir(level), name) is not None


def kernels(level: str | None = None) -> ModuleType | None:
    """The compiled CPU kernels of `level` (default: chosen_level()), built on first use; None where the CPU
    runs no level or they cannot be built."""
    level = level or chosen_level()
    if level is None:
        return None
    if missing_flags(level):
        raise ValueError(f"CPU level {level!r}: this CPU lacks {', '.join(missing_flags(level))}")
    return _load_level(level)


@functools.cache
def _load_level(level: str) -> ModuleType | None:
    name, compile_flags, link_flags = _level_build(level)
    try:
        return build_extension(name, [SOURCE], compile_flags, link_flags)
    except Exception as error:  # a missing compiler or ninja: fall back, but say so once
        message = str(error).strip().splitlines()
        warnings.warn(
            f"rgemma: CPU kernels unavailable ({message[-1] if message else type(error).__name__}); "
            "decoding uses plain PyTorch, which is slower",
            stacklevel=3,
        )
        return None
