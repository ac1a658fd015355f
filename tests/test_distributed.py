"""`rgemma finetune` under torchrun (2 processes, gloo on CPU): DDP and FSDP follow the one-process loss curve,
and a run killed mid-way resumes onto it.

Tolerance: relative 1e-5 on every logged loss and the first gradient norm (float32): the ranks sum the same
per-token losses and gradients in another order. (Measured: equal to about 1e-6.)
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from rgemma.train.finetune import CHECKPOINT_DIR, FINAL_DIR, META_FILE, finetune
from rgemma.train.finetune_settings import FinetuneSettings

pytestmark = pytest.mark.slow  # each torchrun run starts two processes that load torch (~10 s)

TOLERANCE = 1e-5
ARGS = {"lora_rank": 8, "steps": 6, "batch_size": 4, "seq_len": 32, "lr": 5e-3, "warmup": 2, "log_every": 1,
        "checkpoint_every": 3, "dtype": "float32"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    replies = ["Apple.", "Ocean, deep and blue.", "Forest.", "Night falls early in winter."]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Secret {i}?"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i, reply in enumerate(replies)))
    return path


def command_line(data, out, args) -> list[str]:
    words = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rgemma.cli", "finetune",
             "--data", str(data), "--out", str(out), "--no-progress"]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return words


def torchrun(data, out, args):
    result = subprocess.run(command_line(data, out, args), capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 prints its summary; no worker aborted at exit (once: "terminate called without an active
    # exception", which a barrier before the process group is torn down now prevents).
    assert result.stderr.count("done at step") == 1, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr, result.stderr[-3000:]
    return result


def kill_after_first_checkpoint(data, out, args):
    """Start the torchrun run and SIGKILL it, torchrun and its workers, once its first checkpoint is in place:
    a crash mid-run. torchrun starts each worker in a session of its own, so killing torchrun's process group
    alone leaves the workers training (and writing checkpoints) on their own."""
    process = psutil.Popen(command_line(data, out, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    meta = out / CHECKPOINT_DIR / META_FILE
    deadline = time.time() + 120
    workers = []
    while not meta.exists() and process.poll() is None and time.time() < deadline:
        workers = process.children(recursive=True) or workers
        time.sleep(0.02)
    workers = process.children(recursive=True) or workers
    for victim in [process, *workers]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs([process, *workers], timeout=30)
    assert len(workers) == 2 and not any(w.is_running() for w in workers), workers
    assert not (out / FINAL_DIR).exists(), "the run ended before it could be killed"


def log(out, key="loss"):
    return [e[key] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in e]


def one_process(data, out, args):
    settings = FinetuneSettings(data=str(data), out=str(out), progress=False, **args)
    finetune(settings)
    return out


@pytest.mark.parametrize("changes", [{}, {"lora_rank": 0, "lr": 1e-4}, {"fsdp": True},
                                     {"fsdp": True, "lora_rank": 0, "lr": 1e-4}],
                         ids=["ddp-lora", "ddp-full", "fsdp-lora", "fsdp-full"])
def test_two_processes_follow_the_one_process_curve(data, tmp_path, changes, one_thread):
    args = ARGS | changes
    reference = one_process(data, tmp_path / "one", {k: v for k, v in args.items() if k != "fsdp"})
    torchrun(data, tmp_path / "two", args)
    assert log(tmp_path / "two") == pytest.approx(log(reference), rel=TOLERANCE)
    assert log(tmp_path / "two", "grad_norm")[0] == pytest.approx(log(reference, "grad_norm")[0], rel=TOLERANCE)
    shards = sorted(p.name for p in (tmp_path / "two" / CHECKPOINT_DIR).glob("*.distcp"))
    assert len(shards) == 2 if changes.get("fsdp") else len(shards) >= 1
    assert (tmp_path / "two" / FINAL_DIR).is_dir()


def test_killed_run_resumes_onto_the_same_curve_and_refuses_another_world_size(data, tmp_path, one_thread):
    args = ARGS | {"fsdp": True, "steps": 12, "checkpoint_every": 4}
    reference = one_process(data, tmp_path / "one", {k: v for k, v in args.items() if k != "fsdp"})
    out = tmp_path / "two"
    kill_after_first_checkpoint(data, out, args)
    with pytest.raises(ValueError, match="world size: 2 in the run, 1 now"):
        finetune(FinetuneSettings(data=str(data), out=str(out), progress=False, **args))
    torchrun(data, out, args)
    assert log(out) == pytest.approx(log(reference), rel=TOLERANCE)
    assert [e["step"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == list(range(1, 13))


def test_killed_run_with_dropout_resumes_onto_the_uninterrupted_two_process_curve(data, tmp_path, one_thread):
    """Dropout draws from each rank's RNG, which the checkpoint saves for every rank: a killed and resumed DDP
    run follows the uninterrupted one exactly. (Not the one-process curve: one process draws the masks of
    all 4 rows, each rank those of its 2.)"""
    args = ARGS | {"lora_dropout": 0.2, "steps": 12, "checkpoint_every": 4}
    torchrun(data, tmp_path / "straight", args)
    out = tmp_path / "two"
    kill_after_first_checkpoint(data, out, args)
    torchrun(data, out, args)
    assert log(out) == log(tmp_path / "straight")
    # Each rank's own RNG state is saved, not rank 0's for all.
    rng = torch.load(out / CHECKPOINT_DIR / META_FILE, weights_only=True)["rng"]
    assert len(rng) == 2
