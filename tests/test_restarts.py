"""In-job restarts: `accel-dp run --max-restarts N` hands torch's elastic agent its restart budget, and the recipes
resume from `latest` by themselves on a restart (recipes/faults.py's Attempt, accel_dp/runner.py). Through
`accel-dp run` on 2 CPU processes: a killed worker is restarted and the run ends bitwise where one never interrupted
ends; a budget spent ends with the last failure's line and status; bad input and Ctrl-C are never restarted.

These start and kill real processes (seconds each): they run with the fault step (`make test-faults`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import faults
import psutil
import pytest
import torch
from conftest import descendants, fault_matrix_args, saved_parameters, start_with_fault

pytestmark = pytest.mark.faults


def restart_args(run_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """The fault matrix's run with a checkpoint every 2 steps: the fault, at step 3, lands after the first."""
    return [*fault_matrix_args(run_dir, token_cache), "--checkpointing_steps", "2", *extra]


def restart_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == "restart"]


def no_process_left(run_dir: Path) -> bool:
    def of_this_run(process: psutil.Process) -> bool:
        try:
            return str(run_dir) in " ".join(process.cmdline())
        except psutil.Error:
            return False

    deadline = time.monotonic() + 10
    while any(of_this_run(p) for p in psutil.process_iter()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(of_this_run(p) for p in psutil.process_iter())


def test_a_killed_worker_is_restarted_and_the_run_ends_bitwise_where_one_never_interrupted_ends(
    tmp_path, token_cache, matrix_reference
):
    run_dir = tmp_path / "run"
    run = start_with_fault(2, restart_args(run_dir, token_cache), ("--max-restarts", "2"),
                           ACCEL_DP_FAULT_PHASE="training", ACCEL_DP_FAULT_SIGNAL="SIGKILL")  # fmt: skip
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert not [line for line in stderr.splitlines() if line.startswith("error:")], stderr[-3000:]
    assert torch.equal(saved_parameters(run_dir), matrix_reference[2])
    [record] = restart_records(run_dir)  # one restart, resumed from the checkpoint before the kill
    assert record["restart"] == 1 and record["max_restarts"] == 2 and record["resumed_step"] == 2
    assert record["reason"] == "rank 0: lost contact with rank 1 (connection reset)"
    assert "gpt-pretrain: restart 1 of 2 after rank 0: lost contact with rank 1" in stdout + stderr
    assert no_process_left(run_dir)


def test_a_spent_restart_budget_ends_with_the_last_failures_own_line_and_status(tmp_path, token_cache):
    run_dir = tmp_path / "run"
    run = start_with_fault(2, restart_args(run_dir, token_cache), ("--max-restarts", "1"),
                           ACCEL_DP_FAULT_PHASE="training", ACCEL_DP_FAULT_SIGNAL="SIGKILL",
                           ACCEL_DP_FAULT_EVERY_ATTEMPT="1")  # fmt: skip
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 137, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: rank 1 was killed by SIGKILL"), stderr[-3000:]
    assert sum("lost contact" in line for line in errors) == 1  # the last attempt's lines only
    assert "accel-dp: the run failed after 1 restart(s) of the 1 allowed (--max-restarts)" in stderr
    assert len(restart_records(run_dir)) == 1 and no_process_left(run_dir)


def test_bad_input_under_restarts_is_refused_once_and_never_restarted(tmp_path, token_cache):
    run_dir = tmp_path / "run"
    run = start_with_fault(2, restart_args(run_dir, token_cache, "--learning_rate", "nan"), ("--max-restarts", "2"))
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == faults.BAD_INPUT_EXIT_CODE, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --learning_rate must be a positive number, got nan"], stderr[-3000:]
    assert "restart" not in stderr.replace("up to 2 restart(s)", "") and not run_dir.exists()


def test_ctrl_c_while_the_run_restarts_stops_it_at_once_and_it_resumes_exactly(tmp_path, token_cache,
                                                                               matrix_reference):  # fmt: skip
    """The agent has restarted the processes after a worker was killed; they are still importing when Ctrl-C comes:
    the run ends with 130 and one line, no process is left, and the same command with --resume_from_checkpoint
    latest ends bitwise where a run never interrupted ends."""
    run_dir = tmp_path / "run"
    run_args = restart_args(run_dir, token_cache)
    run = start_with_fault(2, run_args, ("--max-restarts", "2"), ACCEL_DP_FAULT_PHASE="training",
                           ACCEL_DP_FAULT_SIGNAL="SIGKILL")  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(restart_count(pid) == "1" for pid in descendants(run.pid)):
            assert run.poll() is None and time.monotonic() < deadline, "the run was not restarted"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C at the terminal
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == faults.INTERRUPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted (Ctrl-C)" in stderr, stderr[-3000:]
    assert no_process_left(run_dir) and not list(run_dir.rglob("*.partial"))
    resumed = start_with_fault(2, [*run_args, "--resume_from_checkpoint", "latest"])
    _, resumed_stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_stderr[-3000:]
    assert torch.equal(saved_parameters(run_dir), matrix_reference[2])


def restart_count(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get("TORCHELASTIC_RESTART_COUNT")
    except psutil.Error:
        return None
