"""The fault matrix, through `accel-dp run` on 1 and 2 processes: {Ctrl-C, a preemption's SIGTERM, SIGKILL of one
worker} x {token-cache build, before the first step, mid-training, during a checkpoint save, during evaluation,
during the final save}. Each case checks the exit status, that no process is left, that `latest` names a whole
checkpoint (and, after Ctrl-C or SIGTERM in training, the one written where the run stopped, no partial left), that a
SIGKILL is told by one line naming the killed rank (and, with 2, the survivor's line after it), and that running the
same command with --resume_from_checkpoint latest ends bitwise where a run that was never interrupted ends. The
faults are delivered by tests/fault_injection/sitecustomize.py, from inside rank 0 at the phase, as a user, a
scheduler or the kernel would.

Run with `pytest -m faults` (about 36 x 15 s; `.ci/run` runs it after the main suite).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO_ROOT, free_port, gpt_args, saved_parameters, subprocess_env

pytestmark = pytest.mark.faults

PHASES = ["cache", "first_step", "training", "checkpoint", "eval", "final_save"]
# A signal during the final save finds no further log step to act on: the run finishes, and says so with 0.
EXPECTED = {
    "SIGINT": {**dict.fromkeys(PHASES, 130), "final_save": 0},
    "SIGTERM": {**dict.fromkeys(PHASES, 75), "final_save": 0},
    "SIGKILL": dict.fromkeys(PHASES, 137),
}


def args(output_dir: Path, cache: Path) -> list[str]:
    """12 steps with dropout on (resuming must restore every rank's random state), a log every 2 steps, a
    checkpoint every 4, an evaluation at 6 and 12."""
    return gpt_args(output_dir, cache, "--max_train_steps", "12", "--log_every", "2", "--checkpointing_steps", "4",
                    "--eval_every", "6", "--eval_iters", "2", "--dropout", "0.1", "--sample_tokens", "0",
                    "--global_batch_size", "8")  # fmt: skip


def accel_dp_run(processes: int, run_args: list[str], **fault: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "accel_dp.cli", "run", "gpt-pretrain", "--cpu", "--procs", str(processes),
               "--main-port", str(free_port()), "--", *run_args]  # fmt: skip
    pythonpath = os.pathsep.join([str(REPO_ROOT / "tests" / "fault_injection"), str(REPO_ROOT)])
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, **fault)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, token_cache) -> dict[int, torch.Tensor]:
    """The final parameters of the run never interrupted, on 1 and on 2 processes."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    finals = {}
    for processes in (1, 2):
        run = accel_dp_run(processes, args(folder / str(processes), token_cache))
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        finals[processes] = saved_parameters(folder / str(processes))
    return finals


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("sig", sorted(EXPECTED))
def test_a_fault_ends_truthfully_and_the_run_resumes_exactly(tmp_path, token_cache, uninterrupted, sig, phase,
                                                             processes):  # fmt: skip
    cache = tmp_path / "cache" if phase == "cache" else token_cache  # a build to interrupt: a cache of its own
    run_args = args(tmp_path / "run", cache)
    run = accel_dp_run(processes, run_args, ACCEL_DP_FAULT_PHASE=phase, ACCEL_DP_FAULT_SIGNAL=sig)
    try:
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == EXPECTED[sig][phase], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if sig == "SIGKILL":  # what the out-of-memory killer does: the line names the rank, before any other
        assert errors[0].startswith(f"error: rank {processes - 1} was killed by SIGKILL"), stderr[-3000:]
        assert sum("was killed" in line for line in errors) == 1, stderr[-3000:]
        if processes == 2:
            assert any("rank 0: lost contact with rank 1" in line for line in errors[1:]), stderr[-3000:]
    else:  # the processes stopped on their own, after Ctrl-C as after a preemption: none was killed
        assert not any("was killed" in line for line in errors), stderr[-3000:]
    deadline = time.monotonic() + 10
    while [p for p in psutil.process_iter(["environ"]) if under(p, tmp_path)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["environ"]) if under(p, tmp_path)], "a process was left running"
    checkpoints = tmp_path / "run" / "checkpoints"
    if sig != "SIGKILL" and phase in ("training", "checkpoint", "eval"):  # a checkpoint where the run stopped
        [stopped_at] = re.findall(r"at step (\d+): checkpoint written", stdout + stderr) or [None]
        assert stopped_at and (checkpoints / "latest").read_text() == f"step-{int(stopped_at):07d}", stderr[-3000:]
        assert not list(checkpoints.glob("*.partial"))
    if (checkpoints / "latest").is_file():
        assert (checkpoints / (checkpoints / "latest").read_text() / "training_state.json").is_file()
    if run.returncode != 0:
        resumed = accel_dp_run(processes, [*run_args, "--resume_from_checkpoint", "latest"])
        _, resumed_stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, resumed_stderr[-3000:]
    assert torch.equal(saved_parameters(tmp_path / "run"), uninterrupted[processes])


def under(process: psutil.Process, folder: Path) -> bool:
    """A process of this case: its command line names this case's folder."""
    try:
        return str(folder) in " ".join(process.cmdline())
    except psutil.Error:
        return False
