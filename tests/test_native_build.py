"""Building the native kernels once per install, and choosing their level at run time (rgemma/backends/native.py).

The build tests compile a probe library (no torch headers: a second to build)
through the same builder as the kernels, in processes of their own, as
separate runs of rgemma would.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rgemma.backends import Options, native, prepare
from rgemma.cli import main
from rgemma.config import Config
from rgemma.model import Griffin

PROBE = 'extern "C" int rgemma_probe() { return 42; }\n'

# Builds the probe under ROOT for an environment whose include path is INCLUDE, once the file GO exists.
BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rgemma.backends.native import build_extension
    root, source, include, go = sys.argv[1:]
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.01)
    build_extension("probe", [Path(source)], ["-O1"], [], (include,), root=Path(root), is_python_module=False)
""")


def start_build(root: Path, source: Path, include: Path, go: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(source), str(include), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n", child.stderr.read()
    return child


def finish(child: subprocess.Popen, timeout: float = 300) -> None:
    try:
        _, errors = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()  # a build waiting for ever would outlive the test
        raise
    assert child.returncode == 0, errors


@pytest.fixture
def probe(tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)
    go = tmp_path / "go"
    go.touch()
    includes = [tmp_path / "venv-a" / "include", tmp_path / "venv-b" / "include"]
    for include in includes:
        include.mkdir(parents=True)
    return tmp_path / "cache", source, includes, go


def test_two_environments_used_alternately_build_once_each(probe):
    """Two environments whose include paths differ (two virtual environments, say), run in turn: each builds
    once, into a directory of its own. Sharing one directory, each run rebuilt what the other had built."""
    root, source, includes, go = probe
    for include in [*includes, *includes]:
        finish(start_build(root, source, include, go))
    directories = sorted(root.glob("probe-*/"))
    assert len(directories) == 2
    assert [native.build_count(d) for d in directories] == [1, 1]


def test_runs_started_together_wait_for_one_build(probe):
    root, source, (include, _), go = probe
    go.unlink()
    children = [start_build(root, source, include, go) for _ in range(2)]
    go.touch()  # both are past their imports: they ask for the build at once
    for child in children:
        finish(child)
    [directory] = root.glob("probe-*/")
    assert native.build_count(directory) == 1


def test_a_build_killed_mid_way_does_not_stop_the_next(probe):
    """A process killed while torch's builder ran leaves torch's lock file; with it there, torch waits for ever."""
    root, source, (include, _), go = probe
    finish(start_build(root, source, include, go))
    [directory] = root.glob("probe-*/")
    (directory / "lock").touch()  # as a killed build leaves it
    finish(start_build(root, source, include, go), timeout=120)
    assert native.build_count(directory) == 1


def test_a_changed_source_builds_again(probe):
    root, source, (include, _), go = probe
    finish(start_build(root, source, include, go))
    source.write_text(PROBE + "// changed\n")
    finish(start_build(root, source, include, go))
    assert len(list(root.glob("probe-*/"))) == 2


@pytest.mark.parametrize("change", ["source", "compile flags", "link flags", "include paths", "torch version",
                                    "torch path", "python include", "python version", "compiler"])
def test_the_build_key_covers_what_changes_the_binary(change, monkeypatch, tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)
    arguments = {"sources": [source], "compile_flags": ["-O3"], "link_flags": [], "include_paths": []}
    before = native.build_key(**arguments)
    if change == "source":
        source.write_text(PROBE + " ")
    elif change == "compile flags":
        arguments["compile_flags"] = ["-O3", "-mavx512f"]
    elif change == "link flags":
        arguments["link_flags"] = ["-fsanitize=address"]
    elif change == "include paths":
        arguments["include_paths"] = ["/elsewhere/include"]
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    elif change == "torch path":
        monkeypatch.setattr(torch, "__file__", "/other/venv/torch/__init__.py")
    elif change == "python include":
        paths = native.sysconfig.get_paths()
        monkeypatch.setattr(native.sysconfig, "get_paths", lambda: paths | {"include": "/other/include"})
    elif change == "python version":
        monkeypatch.setattr(sys, "version", sys.version + " other")
    elif change == "compiler":
        monkeypatch.setattr(native, "_compiler", lambda: "g++\ng++ (GCC) 99.0")
    assert native.build_key(**arguments) != before


# Dispatch ---------------------------------------------------------------------------------------------------

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # a Zen 3, say


def test_the_level_is_the_best_the_cpu_flags_allow(monkeypatch):
    monkeypatch.delenv(native.LEVEL_VARIABLE, raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY)
    assert native.machine_levels() == ["avx2"]
    assert native.chosen_level() == "avx2"
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY | {"avx_vnni"})  # an Alder Lake, say
    assert native.machine_levels() == ["avx2", "avx2-vnni"]
    assert native.chosen_level() == "avx2-vnni"
    avx512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"}
    monkeypatch.setattr(native, "cpu_flags", lambda: avx512)
    assert native.chosen_level() == "avx512"
    monkeypatch.setattr(native, "cpu_flags", lambda: avx512 | {"avx512_vnni"})  # a Cascade Lake
    assert native.chosen_level() == "avx512-vnni"
    monkeypatch.setattr(native, "cpu_flags", lambda: avx512 | {"avx512_vnni", "avx512_bf16"})  # a Zen 4
    assert native.machine_levels() == ["avx2", "avx512", "avx512-vnni", "avx512-vnni-bf16"]
    assert native.chosen_level() == "avx512-vnni-bf16"
    sapphire_rapids = avx512 | {"avx512_vnni", "avx512_bf16", "avx_vnni"}
    monkeypatch.setattr(native, "cpu_flags", lambda: sapphire_rapids)
    assert native.chosen_level() == "avx512-vnni-bf16"
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx"}))  # no AVX2: no native kernels
    assert native.chosen_level() is None and native.kernels() is None
    assert Options().resolved().cpu_level is None


def test_a_forced_level_must_be_known_and_run_here(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setenv(native.LEVEL_VARIABLE, "avx2")
    assert native.chosen_level() == "avx2"
    monkeypatch.setenv(native.LEVEL_VARIABLE, "avx512")
    with pytest.raises(ValueError, match="RGEMMA_CPU_LEVEL='avx512': this CPU lacks avx512f, avx512bw, avx512vl"):
        native.chosen_level()
    with pytest.raises(ValueError, match="Options.cpu_level='sse9': valid levels are avx2, avx2-vnni, avx512"):
        Options(cpu_level="sse9").resolved()


def test_the_cpu_flags_come_from_the_kernel():
    """/proc/cpuinfo, where there is one: torch's capability string names no VNNI or BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo here: the flags come from torch's capability string")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
    assert native.cpu_flags() == frozenset(flags)


@pytest.mark.skipif(native.chosen_level() is None or native.kernels() is None, reason="no native kernels here")
def test_the_backend_says_which_level_it_uses(capsys):
    griffin = Griffin(Config.preset("tiny"), dtype=torch.float32).eval()
    level = native.machine_levels()[0]  # the lowest, built apart from the default
    backend = prepare(griffin, options=Options(cpu_level=level))
    assert backend.describe()["cpu_level"] == level
    assert {type(m).level for m in griffin.modules() if hasattr(type(m), "level")} == {level}
    assert prepare(griffin, options=Options(native_kernels=False)).describe()["cpu_level"] == "none (plain PyTorch)"
    assert not [m for m in griffin.modules() if hasattr(type(m), "level")]  # every module back to its plain kind
    assert main(["info", "--hardware"]) == 0
    out = capsys.readouterr().out
    assert f"chosen       {native.chosen_level()}" in out
    assert all(flag in out for flag in native.LEVELS["avx2"].cpu_flags)


def test_build_kernels_names_each_level_and_refuses_one_the_cpu_lacks(monkeypatch, capsys):
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY)
    assert main(["build-kernels", "--level", "avx512"]) == 1
    assert "this CPU lacks avx512f" in capsys.readouterr().err
    assert main(["build-kernels", "--level", "avx3"]) == 1
    assert "valid levels are avx2, avx2-vnni, avx512, avx512-vnni, avx512-vnni-bf16" in capsys.readouterr().err


@pytest.mark.skipif(native.chosen_level() is None or native.kernels() is None, reason="no native kernels here")
def test_build_kernels_reports_a_level_already_built(capsys):
    level = native.chosen_level()  # built by the skipif above
    builds = native.build_count(native.level_build_dir(level))
    assert main(["build-kernels", "--level", level]) == 0
    assert f"[1/1] {level}: already built in {native.level_build_dir(level)}" in capsys.readouterr().out
    assert native.build_count(native.level_build_dir(level)) == builds


@pytest.mark.skipif(native.chosen_level() is None or native.kernels() is None, reason="no native kernels here")
def test_preparing_a_model_loads_its_kernels(monkeypatch):
    """A first run compiles while the model is prepared (the engine's constructor), before any request's clock
    starts: the build is not timed as prompt speed."""
    from rgemma.backends import cpu
    from rgemma.engine import Engine

    loaded = []
    monkeypatch.setattr(cpu, "kernels", lambda level=None: loaded.append(level) or native.kernels(level))
    Engine(Griffin(Config.preset("tiny"), dtype=torch.float32).eval(), tokenizer=None)
    assert loaded == [native.chosen_level()]
