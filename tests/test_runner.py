"""accel-dp's runner (accel_dp/runner.py): the recipe's exit status and each error line once, through accelerate's
launcher, and the signals it passes on."""

from __future__ import annotations

import os
import subprocess

import faults
from conftest import (
    CONFIGS_DIR,
    free_port,
)

from accel_dp import runner

TWO_RANKS = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
error = Path(os.environ["ACCEL_DP_ERROR_DIR"], f"rank-{rank}")
if rank == 1:  # fails at once, as the run kit does: its line into the runner's folder, then its own status
    error.write_text("error: the same bad input\\nerror: only rank 1 saw this\\n")
    sys.exit(3)
error.write_text("error: the same bad input\\n")
time.sleep(60)  # until the launcher, seeing rank 1 gone, stops it
"""


def test_runner_returns_the_first_failing_process_s_status_and_each_error_line_once(tmp_path, capfd):
    script = tmp_path / "ranks.py"
    script.write_text(TWO_RANKS)
    before = dict(os.environ)
    args = ["--config_file", str(CONFIGS_DIR / "multi_cpu.yaml"), "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1", str(script)]  # fmt: skip
    code = runner.run(args, {"ACCELERATE_USE_CPU": "1"})
    err = capfd.readouterr().err
    # Rank 0, stopped by the launcher (SIGTERM), does not hide rank 1's own status behind its -15.
    assert code == 3
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: the same bad input",
        "error: only rank 1 saw this",
    ]
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert dict(os.environ) == before  # a caller in the same process keeps its environment


def test_runner_keeps_the_launcher_s_own_output_when_the_launcher_fails(tmp_path, capfd):
    code = runner.run(["--config_file", str(CONFIGS_DIR / "cpu.yaml"), str(tmp_path / "no_such_script.py")])
    assert code == 2 and "no_such_script.py" in capfd.readouterr().err  # python's own message, as it is


def test_only_a_process_a_signal_killed_is_reported_as_killed_and_only_sigkill_blames_memory():
    """A recipe stopped by Ctrl-C exits 130 on its own, after its checkpoint: no "killed by SIGINT" line. A process
    killed by a signal gets the shell's 128 + N and one line; only SIGKILL (the out-of-memory killer) mentions
    memory."""

    from accel_dp.runner import as_status, exit_status, killed_line

    code, rank = exit_status(subprocess.CalledProcessError(130, ["recipe"]))  # accelerate's one-process launcher
    assert as_status(code) == 130 and killed_line(code, rank) is None
    code, rank = exit_status(subprocess.CalledProcessError(-9, ["recipe"]))
    assert as_status(code) == 137 and "rank 0 was killed by SIGKILL" in killed_line(code, rank)
    assert "memory" in killed_line(code, rank)
    code, rank = exit_status(subprocess.CalledProcessError(-2, ["recipe"]))
    assert as_status(code) == 130 and "killed by SIGINT" in killed_line(code, rank)
    assert "memory" not in killed_line(code, rank)


def test_accel_dp_passes_on_the_kits_exit_codes():
    assert runner.PREEMPTED_EXIT_CODE == faults.PREEMPTED_EXIT_CODE == 75
    assert runner.ERROR_DIR_VARIABLE == faults.ERROR_DIR_VARIABLE


def test_a_signal_decides_the_ending_only_where_it_killed_a_process_or_nothing_had_started():
    """After a preemption: a process the SIGTERM killed before it could keep it (-15), or a launch that never started
    a process (nodes that never came), ends as preempted with one line; a recipe's own status stands (it kept the
    signal: 75 after its checkpoint, or it failed on its own). Without a signal nothing changes."""
    import signal

    relay = runner.SignalRelay()
    assert relay.ending(-15) == (-15, None) and relay.ending(1) == (1, None)
    relay.pending, relay.started_any = signal.SIGTERM, False
    code, line = relay.ending(-15)
    assert code == 75 and "preempted (SIGTERM) before training began" in line
    relay.started_any = True
    assert relay.ending(-15)[0] == 75 and relay.ending(75) == (75, None) and relay.ending(1) == (1, None)
    relay.pending = signal.SIGINT
    code, line = relay.ending(-2)
    assert code == 130 and "interrupted (Ctrl-C) before training began" in line
    assert relay.ending(130) == (130, None)


def test_a_node_range_becomes_accelerates_node_count_and_the_fewest_nodes():
    args = ["--config_file", "c.yaml", "--num_processes", "3", "--num_machines", "1:3", "--machine_rank", "0", "r.py"]
    assert runner.node_range(args) == ([*args[:5], "3", *args[6:]], 1)
    assert runner.node_range(["--num_machines", "2", "r.py", "--num_machines", "1:2"]) == (
        ["--num_machines", "2", "r.py", "--num_machines", "1:2"],
        None,
    )  # (a plain count; and what follows the script is the recipe's)
    assert runner.node_range(["r.py"]) == (["r.py"], None)
