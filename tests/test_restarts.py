"""In-job restarts: `accel-dp run --max-restarts N` hands torch's elastic agent its restart budget, and the recipes
resume from `latest` by themselves on a restart (recipes/faults.py's Attempt, accel_dp/runner.py). Through
`accel-dp run` on 2 CPU processes: a killed worker is restarted and the run ends bitwise where one never interrupted
ends; a budget spent ends with the last failure's line and status; bad input and Ctrl-C are never restarted.

Elastic membership (`accel-dp run --nodes MIN:MAX`), with "nodes" of one process each on 127.0.0.1: a node lost
mid-run leaves the other to finish alone, and a node that joins mid-run is taken in; either run ends within 1e-5 of
one never interrupted (dropout off: the sums of another layout round differently).

These start and kill real processes (seconds each): they run with the fault step (`make test-faults`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import faults
import psutil
import pytest
import torch
from conftest import (
    descendants,
    fault_matrix_args,
    free_port,
    read_metrics,
    saved_parameters,
    start_with_fault,
)

pytestmark = pytest.mark.faults


def restart_args(run_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """The fault matrix's run with a checkpoint every 2 steps: the fault, at step 3, lands after the first."""
    return [*fault_matrix_args(run_dir, token_cache), "--checkpointing_steps", "2", *extra]


def restart_records(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir) if record.get("event") == "restart"]


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


# Rendezvous settings for loopback nodes: a dead node is given up after 5 s without a heartbeat, and a group waits 3 s
# for more nodes once it has its fewest (the defaults, for real clusters: 15 s and 30 s; docs/data_parallel.md).
TEST_RENDEZVOUS = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=5,join_timeout=120"


def node_args(run_dir: Path, token_cache: Path) -> list[str]:
    return restart_args(run_dir, token_cache, "--dropout", "0")


def start_node(run_args: list[str], nodes: str, node_rank: int, port: int, **fault: str):
    """`accel-dp run --nodes NODES --node-rank R` on one CPU process, joining the rendezvous on 127.0.0.1:port."""
    options = (
        "--nodes",
        nodes,
        "--node-rank",
        str(node_rank),
        "--main-ip",
        "127.0.0.1",
        "--rdzv-conf",
        TEST_RENDEZVOUS,
    )
    return start_with_fault(1, run_args, options, port=port, **fault)


def ended(*runs, timeout: float = 300) -> list[tuple[int, str]]:
    """Each run's (exit status, stdout + stderr), every process of theirs killed if one overstays."""
    try:
        outputs = [run.communicate(timeout=timeout) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    return [(run.returncode, stdout + stderr) for run, (stdout, stderr) in zip(runs, outputs, strict=True)]


@pytest.fixture(scope="module")
def two_process_parameters(tmp_path_factory, token_cache):
    """The node tests' run never interrupted, on 2 processes of one machine."""
    run_dir = tmp_path_factory.mktemp("uninterrupted-nodes") / "run"
    [(code, output)] = ended(start_with_fault(2, node_args(run_dir, token_cache)))
    assert code == 0, output[-3000:]
    return saved_parameters(run_dir)


@pytest.mark.xdist_group("nodes")
def test_a_node_lost_mid_run_leaves_the_other_to_finish_alone_within_1e_5(tmp_path, token_cache,
                                                                          two_process_parameters):  # fmt: skip
    """Node 1's accel-dp run is killed (SIGKILL) at its third step: its process dies with it, node 0's loses contact,
    and torch's agent re-forms the group on node 0 alone, which resumes the latest checkpoint with twice the
    accumulation and finishes."""
    run_dir, port = tmp_path / "run", free_port()
    main = start_node(node_args(run_dir, token_cache), "1:2", 0, port)
    lost = start_node(node_args(run_dir, token_cache), "1:2", 1, port, ACCEL_DP_FAULT_PHASE="training",
                      ACCEL_DP_FAULT_SIGNAL="SIGKILL_LAUNCHER")  # fmt: skip
    (code, output), (lost_code, _) = ended(main, lost)
    assert code == 0 and lost_code == -signal.SIGKILL, output[-3000:]
    assert torch.allclose(saved_parameters(run_dir), two_process_parameters, rtol=0, atol=1e-5)
    [record] = restart_records(run_dir)
    assert record["nodes"] == [2, 1] and record["processes"] == [2, 1] and "lost contact" in record["reason"]
    assert f"2 -> 1 nodes: resuming at step {record['resumed_step']} on 1 process(es), accumulation 1 -> 2" in output
    assert no_process_left(run_dir)


@pytest.mark.xdist_group("nodes")
def test_a_node_that_joins_mid_run_is_taken_in_and_the_run_ends_within_1e_5(tmp_path, token_cache,
                                                                            two_process_parameters):  # fmt: skip
    """Node 0 of `--nodes 1:3` trains alone and waits at its third step; node 2 starts: torch's agent stops node 0's
    process (SIGTERM: it checkpoints, and is not an ending), and the group re-forms on both nodes, which resume the
    checkpoint on 2 processes (no restart counted, nothing trained again) and finish."""
    run_dir, port = tmp_path / "run", free_port()
    main = start_node(node_args(run_dir, token_cache), "1:3", 0, port, ACCEL_DP_FAULT_PHASE="training",
                      ACCEL_DP_FAULT_SIGNAL="HOLD")  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "latest").is_file():  # (step 2: node 0 is training alone)
        assert main.poll() is None and time.monotonic() < deadline, "node 0 wrote no checkpoint"
        time.sleep(0.1)
    joining = start_node(node_args(run_dir, token_cache), "1:3", 2, port)
    (code, output), (joined_code, joined_output) = ended(main, joining)
    assert code == 0 and joined_code == 0, (output + joined_output)[-3000:]
    assert torch.allclose(saved_parameters(run_dir), two_process_parameters, rtol=0, atol=1e-5)
    [record] = [r for r in read_metrics(run_dir) if r.get("event") == "regroup"]
    assert record["nodes"] == [1, 2] and record["processes"] == [1, 2] and record["replayed_steps"] == 0
    assert not restart_records(run_dir)  # (a node joining costs no restart)
    assert "a node joined: 1 -> 2 nodes: resuming at step 4 on 2 process(es), accumulation 2 -> 1" in output
    assert no_process_left(run_dir)


@pytest.mark.xdist_group("nodes")
def test_sigterm_to_one_node_stops_every_node_with_a_checkpoint_and_75(tmp_path, token_cache):
    """A preemption of node 1 (SIGTERM to its accel-dp run, at its third step) is not a node leaving: every process
    checkpoints together and both nodes end with 75, nothing restarted, nothing left running."""
    run_dir, port = tmp_path / "run", free_port()
    main = start_node(node_args(run_dir, token_cache), "1:2", 0, port)
    other = start_node(node_args(run_dir, token_cache), "1:2", 1, port, ACCEL_DP_FAULT_PHASE="training",
                       ACCEL_DP_FAULT_SIGNAL="SIGTERM")  # fmt: skip
    (code, output), (other_code, other_output) = ended(main, other)
    assert code == other_code == faults.PREEMPTED_EXIT_CODE, (output + other_output)[-3000:]
    stopped = [line for line in output.splitlines() if "preempted" in line]
    assert len(stopped) == 1 and "checkpoint written" in stopped[0], output[-3000:]
    assert "before training began" not in output + other_output
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:07d}"
    assert not restart_records(run_dir) and no_process_left(run_dir)
