"""recipes/faults.py, and every way a run is interrupted: the signal state and how a process leaves (in-process,
fast), then the fault matrix through `accel-dp run` on 1 and 2 processes: {Ctrl-C, a preemption's SIGTERM, SIGKILL
of one worker} x {token-cache build, before the first step, mid-training, during a checkpoint save, during
evaluation, during the final save}. Each case checks the exit status, that no process is left, that `latest` names a
whole checkpoint (and, after Ctrl-C or SIGTERM in training, the one written where the run stopped, no partial left),
that a SIGKILL is told by one line naming the killed rank (and, with 2, the survivor's line after it), and that
running the same command with --resume_from_checkpoint latest ends bitwise where a run that was never interrupted
ends. The faults are delivered by tests/fault_injection/sitecustomize.py, from inside rank 0 at the phase, as a user,
a scheduler or the kernel would. Then preemptions of whole runs, a lost node, Ctrl-C during the token cache, and
SIGTERM through accel-dp's runner.

The tests marked `faults` (minutes) run in `make test-faults`, .ci/run's second step; `pytest tests/test_faults.py`
runs them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import psutil
import pytest
import torch
from accelerate import PartialState
from conftest import (
    REPO_ROOT,
    SHAKESPEARE,
    accel_dp_command,
    descendants,
    fault_matrix_args,
    free_port,
    glue_resumable_args,
    gpt_args,
    gpt_resumable_args,
    kill_process_tree,
    logged_curve,
    recipe_command,
    run_to_the_end,
    saved_parameters,
    start_with_fault,
    subprocess_env,
)


@pytest.fixture
def own_signal_handlers():
    """StopSignals installs handlers for the whole process: give pytest's back afterwards."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in kept.items():
        signal.signal(sig, handler)


class Trigger:
    """accelerate's trigger as one process sees it: set here, or set by another process."""

    def __init__(self, set_elsewhere: bool = False):
        self.set_here, self.set_elsewhere = False, set_elsewhere

    def set_trigger(self):
        self.set_here = True

    def check_trigger(self):
        return self.set_here or self.set_elsewhere


def test_a_preemption_is_kept_for_the_next_log_step_and_says_which_signal(own_signal_handlers):
    PartialState(cpu=True)  # (the log line needs accelerate's state)
    signals = faults.StopSignals()
    assert not signals.anywhere(Trigger())
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.received == "SIGUSR1" and not signals.interrupted
    assert signals.anywhere(Trigger()) and signals.describe() == "preempted (SIGUSR1)"
    with pytest.raises(SystemExit) as exit_info:
        signals.end_run("gpt-pretrain: preempted at step 4: checkpoint written")
    assert exit_info.value.code == faults.PREEMPTED_EXIT_CODE == 75


def test_a_signal_to_another_process_stops_this_one_too(own_signal_handlers):
    signals = faults.StopSignals()
    assert signals.anywhere(Trigger(set_elsewhere=True))
    assert signals.describe() == "preempted (a signal to another rank)"


def test_ctrl_c_stops_at_once_before_training_then_is_kept_once_and_the_second_stops_at_once(own_signal_handlers):
    PartialState(cpu=True)
    signals = faults.StopSignals()
    with pytest.raises(KeyboardInterrupt):  # the token cache or the model still being prepared: no waiting
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    signals.training_began()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert signals.interrupted and signals.describe() == "interrupted (Ctrl-C)"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    with pytest.raises(SystemExit) as exit_info:
        signals.end_run("stopped")
    assert exit_info.value.code == faults.INTERRUPTED_EXIT_CODE == 130


def test_run_main_leaves_with_the_code_the_run_earned_and_one_line(capsys):
    def bad_input():
        faults.fail("--block_size must be a positive integer, got 0")

    def interrupted():
        raise KeyboardInterrupt

    for main, code, line in ((bad_input, 2, "error: --block_size must be"), (interrupted, 130, "error: interrupted")):
        with pytest.raises(SystemExit) as exit_info:
            faults.run_main(main, "gpt-pretrain")
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert exit_info.value.code == code and len(errors) == 1 and errors[0].startswith(line)
    assert faults.run_main(lambda: None, "gpt-pretrain") is None  # a finished run returns: exit 0

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # one process: its own traceback, as Python prints it
        faults.run_main(bug, "gpt-pretrain")


def test_what_must_happen_before_leaving_happens_however_the_run_ends():
    """The run folder's lock is released so: after a finished run, bad input, a failure during training, Ctrl-C and
    a crash alike."""
    released = []

    def ending(how):
        def main():
            faults.before_leaving(lambda: released.append(how))
            if how == "stop":
                faults.stop("could not write metrics.jsonl")
            if how == "Ctrl-C":
                raise KeyboardInterrupt
            if how == "crash":
                raise ZeroDivisionError

        return main

    for how in ("finished", "stop", "Ctrl-C", "crash"):
        with contextlib.suppress(SystemExit, ZeroDivisionError):
            faults.run_main(ending(how), "gpt-pretrain")
    assert released == ["finished", "stop", "Ctrl-C", "crash"]


def test_what_a_block_would_leave_half_done_is_undone_only_if_the_process_leaves_inside_it():
    """A checkpoint's staging folder: removed by a process that leaves mid-save (a peer may write its files after the
    failing process removed the folder), kept by one that finished the save."""
    undone = []

    def main(fail_inside: bool):
        with faults.undone_if_leaving(lambda: undone.append(fail_inside)):
            if fail_inside:
                faults.stop("could not write checkpoint")

    for fail_inside in (False, True):
        with contextlib.suppress(SystemExit):
            faults.run_main(lambda fail_inside=fail_inside: main(fail_inside), "gpt-pretrain")
    assert undone == [True]


@pytest.mark.parametrize("world_size, code", [("2", 0), ("2", 75), ("1", 0)])
def test_one_of_several_processes_leaves_without_interpreter_teardown_once_its_output_is_out(world_size, code):
    """torch's C++ teardown at interpreter exit can abort a finished multi-process run (status 134, and the launcher
    then kills the rest): a process of several leaves through os._exit, finished or not, after its lines and its
    before-leaving work; one process alone exits as Python does."""
    program = (
        "import atexit, faults\n"
        "atexit.register(lambda: print('interpreter teardown', flush=True))\n"
        "faults.before_leaving(lambda: print('lock released'))\n"
        "print('final line', end='')\n"
        f"faults.run_main(lambda: {'None' if code == 0 else f'exit({code})'}, 'gpt-pretrain')\n"
    )
    env = subprocess_env(WORLD_SIZE=world_size, PYTHONPATH=str(REPO_ROOT / "recipes"))
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout.startswith("final linelock released")
    assert ("interpreter teardown" in result.stdout) == (world_size == "1")


@pytest.mark.parametrize(
    "attempt, ends, code, recorded",
    [("0", "faults.fail('bad')", 0, "2"),  # bad input: no restart mends it, so the agent must not restart
     ("0", "faults.leave(1, mendable=True)", 1, None),  # a lost peer: restarted
     ("2", "faults.fail('bad')", 2, None)],  # the budget spent: no restart to hold off
)  # fmt: skip
def test_under_restarts_an_ending_no_restart_mends_exits_0_and_leaves_its_code_to_accel_dp(tmp_path, attempt, ends,
                                                                                           code, recorded):  # fmt: skip
    env = subprocess_env(
        PYTHONPATH=str(REPO_ROOT / "recipes"),
        TORCHELASTIC_RESTART_COUNT=attempt,
        TORCHELASTIC_MAX_RESTARTS="2",
        ACCEL_DP_ERROR_DIR=str(tmp_path),
        RANK="1",
        WORLD_SIZE="2",
    )
    program = f"import faults\nfaults.run_main(lambda: {ends}, 'gpt-pretrain')"
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    marker = tmp_path / "ended-1"
    assert (marker.read_text() if marker.exists() else None) == recorded


def test_a_process_started_after_the_run_ended_on_purpose_leaves_at_once_and_records_nothing(tmp_path):
    """A restarted process that finds the ending recorded (here accel-dp's, after Ctrl-C) adds no record of its own:
    accel-dp then knows no process said how the run ended, and says it itself."""
    (tmp_path / "ended-runner").write_text(str(faults.INTERRUPTED_EXIT_CODE))
    env = subprocess_env(PYTHONPATH=str(REPO_ROOT / "recipes"), TORCHELASTIC_RESTART_COUNT="1",
                         TORCHELASTIC_MAX_RESTARTS="2", ACCEL_DP_ERROR_DIR=str(tmp_path), RANK="1",
                         WORLD_SIZE="2")  # fmt: skip
    program = "import faults\nfaults.run_main(lambda: print('trained'), 'gpt-pretrain')"
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "trained" not in result.stdout, result.stderr
    assert [p.name for p in tmp_path.glob("ended-*")] == ["ended-runner"] and not list(tmp_path.glob("rank-*"))


def test_a_restart_sets_the_attempt_befores_lines_aside_and_says_why_it_ended(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ERROR_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    (tmp_path / "rank-0").write_text(
        "error: rank 0: lost contact with rank 1 (connection reset); stopping. Resume with --resume_from_checkpoint\n"
    )
    attempt = faults.Attempt(number=1, max_restarts=3)
    attempt.set_aside_previous_lines()
    assert not list(tmp_path.glob("rank-*"))  # accel-dp prints the last attempt's lines only
    assert attempt.previous_ending() == "rank 0: lost contact with rank 1 (connection reset)"
    assert faults.Attempt(number=2, max_restarts=3).previous_ending().startswith("a process ended without a word")
    assert attempt.may_restart and not faults.Attempt(number=3, max_restarts=3).may_restart


def test_an_error_line_goes_to_accel_dps_folder_when_it_runs_the_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(faults.ERROR_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        faults.stop("lost contact with rank 0")
    assert (tmp_path / "rank-1").read_text() == "error: lost contact with rank 0\n"
    assert capsys.readouterr().err == ""  # accel-dp prints each distinct line once, for all processes


# ---------------------------------------------------------------------------------------------------------------
# The fault matrix.

PHASES = ["cache", "first_step", "training", "checkpoint", "eval", "final_save"]
# A signal during the final save finds no further log step to act on: the run finishes, and says so with 0.
EXPECTED = {
    "SIGINT": {**dict.fromkeys(PHASES, 130), "final_save": 0},
    "SIGTERM": {**dict.fromkeys(PHASES, 75), "final_save": 0},
    "SIGKILL": dict.fromkeys(PHASES, 137),
}


@pytest.mark.faults
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("sig", sorted(EXPECTED))
def test_a_fault_ends_truthfully_and_the_run_resumes_exactly(tmp_path, token_cache, matrix_reference, sig, phase,
                                                             processes):  # fmt: skip
    cache = tmp_path / "cache" if phase == "cache" else token_cache  # a build to interrupt: a cache of its own
    run_args = fault_matrix_args(tmp_path / "run", cache)
    run = start_with_fault(processes, run_args, ACCEL_DP_FAULT_PHASE=phase, ACCEL_DP_FAULT_SIGNAL=sig)
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
        resumed = start_with_fault(processes, [*run_args, "--resume_from_checkpoint", "latest"])
        _, resumed_stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, resumed_stderr[-3000:]
    assert torch.equal(saved_parameters(tmp_path / "run"), matrix_reference[processes])


# The write-fault matrix: the disk fills at each write of a run (tests/fault_injection: ENOSPC, with half of what was
# being written on the disk). What is written, and which of them: (ACCEL_DP_FAULT_FILE, ACCEL_DP_FAULT_NTH).
FULL_DISK_AT = {
    "metrics_line": ("metrics.jsonl", 5),  # the 5th record: after the checkpoint at step 4
    "checkpoint_file": ("step-", 2),  # the weights of the checkpoint at step 8
    "manifest": ("training_state.json", 2),
    "latest": ("latest.partial", 2),
    "all_results": ("all_results.json.partial", 1),
    "final_model": ("final-model", 1),
}


def assert_every_file_whole_or_absent(run_dir: Path) -> None:
    """No partial file or folder; every JSON file and metrics.jsonl line parses; `latest` names a whole checkpoint."""
    partial = [p for p in run_dir.rglob("*") if p.name.endswith(".partial")]
    assert not partial, partial
    for file in run_dir.rglob("*.json"):
        json.loads(file.read_text())
    if (run_dir / "metrics.jsonl").is_file():
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        assert (latest.parent / latest.read_text() / "training_state.json").is_file()


@pytest.mark.faults
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("write", sorted(FULL_DISK_AT))
def test_a_full_disk_at_any_write_ends_in_one_line_and_the_run_resumes_exactly(
    tmp_path, token_cache, matrix_reference, write, processes
):
    name, nth = FULL_DISK_AT[write]
    run_args = fault_matrix_args(tmp_path / "run", token_cache)
    run = start_with_fault(processes, run_args, ACCEL_DP_FAULT_PHASE="enospc", ACCEL_DP_FAULT_FILE=name,
                           ACCEL_DP_FAULT_NTH=str(nth))  # fmt: skip
    try:
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == faults.FAILED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "MiB are free" in errors[0], stderr[-3000:]
    deadline = time.monotonic() + 10
    while [p for p in psutil.process_iter(["environ"]) if under(p, tmp_path)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["environ"]) if under(p, tmp_path)], "a process was left running"
    assert_every_file_whole_or_absent(tmp_path / "run")
    assert not (tmp_path / "run" / "run.lock").exists()
    resumed = start_with_fault(processes, [*run_args, "--resume_from_checkpoint", "latest"])
    _, resumed_stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_stderr[-3000:]
    assert torch.equal(saved_parameters(tmp_path / "run"), matrix_reference[processes])


def under(process: psutil.Process, folder: Path) -> bool:
    """A process of this case: its command line names this case's folder."""
    try:
        return str(folder) in " ".join(process.cmdline())
    except psutil.Error:
        return False


@pytest.mark.faults
def test_ctrl_c_while_preparing_the_token_cache_exits_130_and_leaves_no_lock(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 20)
    command = [sys.executable, "-m", "accel_dp", "prepare", "gpt-pretrain", "--", "--train_file", str(corpus),
               "--tokenizer", "byte", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    run = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache").glob("*.tmp-*/train.bin")):
            assert run.poll() is None and time.monotonic() < deadline, "tokenizing never started"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, stderr[-3000:]
    assert "interrupted (Ctrl-C)" in stderr and "Traceback" not in stderr
    cache = tmp_path / "cache"  # (removed whole: the build had made it, and nothing else is in it)
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert not [name for name in left if name.endswith(".lock") or ".tmp-" in name], left


@pytest.mark.faults  # signals: with the fault matrix (`make test-faults`, .ci/run's second step)
def test_a_sigterm_to_accel_dp_run_reaches_every_rank_and_it_exits_75_after_the_last(tmp_path):
    """Through the real chain (accel-dp's runner, accelerate's launcher, torchrun, 2 ranks): every rank gets the
    SIGTERM at once and writes its checkpoint, the slow one too, and accel-dp exits with their 75 only then."""
    from accel_dp.runner import PREEMPTED_EXIT_CODE

    script = tmp_path / "rank.py"
    script.write_text(RANK_THAT_CHECKPOINTS_ON_SIGTERM)
    driver = (  # what `accel-dp run` does, for a script that is not a recipe
        "import sys; from pathlib import Path; from accel_dp.launch import RunOptions, build_launch; "
        "from accel_dp.runner import run; "
        "options = RunOptions(cpu=True, procs=2, main_port=int(sys.argv[3]), recipe_args=(sys.argv[2],)); "
        "launch = build_launch(Path(sys.argv[1]), options, 0); sys.exit(run(launch.launcher_args, launch.env))"
    )
    command = [sys.executable, "-c", driver, str(script), str(tmp_path), str(free_port())]
    process = subprocess.Popen(command, env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        saved = sorted(p.name for p in tmp_path.glob("saved-*"))  # as accel-dp has exited
    finally:
        kill_process_tree(process.pid)
    assert code == PREEMPTED_EXIT_CODE and saved == ["saved-0", "saved-1"]


@pytest.mark.faults
@pytest.mark.parametrize("after_s", [0.3, 1.0, 2.5])
def test_sigterm_in_the_first_seconds_of_accel_dp_run_ends_as_a_preemption(tmp_path, after_s, token_cache):
    """While accel-dp starts, while accelerate's launcher is imported, while the recipe imports torch: a preemption
    is kept at every moment (75, one line, nothing written, no process left), never a bare 143."""
    args = gpt_args(tmp_path / "run", token_cache, "--max_train_steps", "500")
    process = subprocess.Popen(accel_dp_command("gpt-pretrain", 1, args), env=subprocess_env(), text=True,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        time.sleep(after_s)
        workers = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        kill_process_tree(process.pid)
    assert process.returncode == 75, stderr[-2000:]
    assert "preempted (SIGTERM) before training began: nothing to save" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


@pytest.mark.faults
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_run_waiting_for_a_node_that_never_comes_stops_on_sigterm_or_ctrl_c(tmp_path, token_cache, sig, code):
    """Node 0 of 2, its peer never started: torch's rendezvous would wait for it, deaf to signals. accel-dp stops
    within seconds, nothing started and nothing written, with the exit status of the signal."""
    args = gpt_args(tmp_path / "run", token_cache)
    command = [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--nodes", "2", "--node-rank", "0",
               "--main-ip", "127.0.0.1", "--main-port", str(free_port()), "--", *args]  # fmt: skip
    process = subprocess.Popen(command, env=subprocess_env(), text=True, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    try:
        time.sleep(8)  # (the launcher is in its rendezvous by now)
        assert process.poll() is None
        started = time.monotonic()
        os.killpg(process.pid, sig) if sig == signal.SIGINT else process.send_signal(sig)  # (Ctrl-C: the terminal's)
        _, stderr = process.communicate(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        kill_process_tree(process.pid)
    assert process.returncode == code and stopped_in < 10, stderr[-2000:]
    assert "before training began: nothing to save" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def signal_after_first_checkpoint(recipe: str, procs: int, args: list[str], output_dir: Path, send, via_accel_dp):
    """Start a run, wait for its first checkpoint, call send(process) to signal it; its exit status and output.
    Every process of the run has exited by the time the one started here has."""
    process = subprocess.Popen(recipe_command(recipe, procs, args, via_accel_dp), env=subprocess_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not (output_dir / "checkpoints" / "latest").is_file():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        workers = descendants(process.pid)
        send(process)
        output, _ = process.communicate(timeout=120)
        left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert not left, f"processes of the run left behind: {left}"
    finally:
        kill_process_tree(process.pid)
    assert not (output_dir / "all_results.json").exists(), "the run finished before the signal"
    assert "preempted" in output, output[-2000:]
    return process.returncode, output


def rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among the launcher's descendants."""
    for pid in descendants(launcher_pid):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} worker under {launcher_pid}")


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.parametrize(
    ("recipe", "procs", "how"),
    [pytest.param("gpt-pretrain", 1, "SIGUSR1", marks=pytest.mark.xdist_group("gpt-1")),
     pytest.param("gpt-pretrain", 2, "SIGUSR1 to rank 1 only", marks=pytest.mark.xdist_group("gpt-2")),
     pytest.param("glue-bert", 1, "SIGTERM to accel-dp", marks=pytest.mark.xdist_group("glue-1")),
     pytest.param("gpt-pretrain", 1, "SIGHUP", marks=pytest.mark.xdist_group("gpt-1")),
     pytest.param("gpt-pretrain", 2, "SIGHUP to accel-dp", marks=pytest.mark.xdist_group("gpt-2"))],
)  # fmt: skip
def test_preempted_run_checkpoints_exits_75_and_resumes_bitwise_equal(
    tmp_path, token_cache, uninterrupted, recipe, procs, how
):
    whole, preempted = uninterrupted(recipe, procs), tmp_path / "preempted"

    def args(*extra):
        if recipe == "gpt-pretrain":
            return gpt_resumable_args(preempted, token_cache, "--checkpointing_steps", "20", *extra)
        return glue_resumable_args(preempted, "--checkpointing_steps", "9", *extra)

    senders = {
        "SIGUSR1": lambda process: process.send_signal(signal.SIGUSR1),
        # 1 process: accelerate's own launcher would die without passing it on, and the recipe train on, orphaned.
        # (With several, accel-dp sends it to each: the test above shows it, and the case below, one rank
        # signalled, makes every rank checkpoint.)
        "SIGTERM to accel-dp": lambda process: process.send_signal(signal.SIGTERM),
        "SIGUSR1 to rank 1 only": lambda process: os.kill(rank_process(process.pid, 1), signal.SIGUSR1),
        # A closed terminal or SSH session: kept as a preemption, by the recipe and by accel-dp alike.
        "SIGHUP": lambda process: process.send_signal(signal.SIGHUP),
        "SIGHUP to accel-dp": lambda process: process.send_signal(signal.SIGHUP),
    }
    via_accel_dp = "accel-dp" in how or procs > 1
    code, output = signal_after_first_checkpoint(recipe, procs, args(), preempted, senders[how], via_accel_dp)
    assert code == 75 and "Traceback" not in output, output[-3000:]  # the recipe's status, through accel-dp too
    if how == "SIGUSR1 to rank 1 only":
        assert "preempted (a signal to another rank)" in output
    latest = (preempted / "checkpoints" / "latest").read_text()
    state = json.loads((preempted / "checkpoints" / latest / "training_state.json").read_text())
    assert state["layout"]["processes"] == procs
    assert all((preempted / "checkpoints" / latest / f"random_states_{r}.pkl").is_file() for r in range(procs))
    run_to_the_end(recipe, procs, args("--resume_from_checkpoint", "latest"))
    assert torch.equal(saved_parameters(preempted), saved_parameters(whole))
    assert logged_curve(preempted) == logged_curve(whole)


@pytest.mark.faults  # (with the fault matrix: `make test-faults`, .ci/run's second step)
@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_when_a_node_dies_or_hangs_the_other_stops_within_seconds_naming_the_lost_rank(tmp_path, token_cache, failure):
    """killed: its sockets close and the next collective fails at once. frozen (SIGSTOP, like a hung machine):
    nothing closes, and --ddp_timeout bounds the wait."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        argv = [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--nodes", "2", "--procs", "1",
                "--node-rank", str(rank), "--main-ip", "127.0.0.1", "--main-port", str(port), "--",
                *gpt_resumable_args(tmp_path / f"node{rank}", token_cache, "--max_train_steps", "100000",
                                    "--ddp_timeout", "10")]  # fmt: skip
        nodes.append(subprocess.Popen(argv, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "node0" / "metrics.jsonl").is_file():  # both ranks are training
            assert all(node.poll() is None for node in nodes), "a node stopped before training"
            assert time.monotonic() < deadline, "no training within 180 s"
            time.sleep(0.05)
        if failure == "killed":
            kill_process_tree(nodes[1].pid)  # node 1 vanishes: launcher and rank at once
        else:
            kill_process_tree(nodes[1].pid, signal.SIGSTOP)  # node 1 stops answering
        killed_at = time.monotonic()
        _, stderr = nodes[0].communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        for node in nodes:
            kill_process_tree(node.pid)
    assert nodes[0].returncode not in (0, None)
    assert stopped_after < {"killed": 30, "frozen": 45}[failure]  # frozen: the 10 s timeout, then the check-in
    assert "rank 0: lost contact with rank 1" in stderr, stderr[-3000:]
    assert not (tmp_path / "node0" / "all_results.json").exists()


RANK_THAT_CHECKPOINTS_ON_SIGTERM = """
import os, pathlib, signal, sys, time
out, rank = pathlib.Path(sys.argv[1]), os.environ["RANK"]
seconds = 3 if rank == "1" else 0  # rank 1's checkpoint takes 3 s, rank 0's none
signal.signal(signal.SIGTERM, lambda signum, frame: (time.sleep(seconds), (out / f"saved-{rank}").touch(),
    sys.exit(75)))  # a checkpoint, then the preempted code
(out / f"ready-{rank}").touch()
time.sleep(120)
"""
