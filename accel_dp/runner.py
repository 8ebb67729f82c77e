"""Run `accelerate launch` in this process, so that a run ends the way its recipe decided.

    python -m accel_dp.runner <accelerate launch arguments>   # what `accel-dp run` and `accel-dp slurm`'s script run

One addition to accelerate's arguments: `--num_machines MIN:MAX` (with `--rdzv_backend c10d`), torchrun's node range
for `accel-dp run --nodes MIN:MAX`, which accelerate's launcher cannot pass on (`launch_elastic`).

- The exit status is the recipe's: 2 bad input, 75 preempted (a checkpoint was written), 1 a failure; with several
  processes the first that ended on its own (not killed by the launcher's teardown); 128 + N for one killed by
  signal N from outside (137: SIGKILL, the out-of-memory killer), with a line naming its rank. (`accelerate launch`
  itself exits 1 whenever a process fails, after a launcher traceback.)
- Each distinct error line of the processes is printed once: the recipes' run kit writes it into the folder named by
  ACCEL_DP_ERROR_DIR rather than to the terminal. No launcher traceback buries it; a launcher that fails on its own
  (a bad option, a rendezvous that never completes) keeps its output.
- SIGTERM, SIGUSR1 and SIGHUP (preemption, Slurm's --signal, a closed terminal) reach every process at once as SIGTERM,
  and Ctrl-C (SIGINT) as SIGINT; this process returns only after they have exited (75 after a preemption, 130 after
  Ctrl-C). accelerate's one-process launcher forwards no signal, so this runner signals its children itself; torch's
  elastic agent runs off the main thread, where it installs no signal handlers of its own. The processes then
  checkpoint together (a collective save) and exit; once the first has, torch's agent gives the others 30 s before it
  kills them, far more than they need to leave the save's last barrier.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PREEMPTED_EXIT_CODE = 75  # the recipes' run kit: a checkpoint was written after a signal; run again to resume
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as the recipes' run kit ends it
ERROR_DIR_VARIABLE = "ACCEL_DP_ERROR_DIR"  # the run kit writes each process's error line into this folder


def exit_status(error: BaseException | None) -> tuple[int, int | None]:
    """(exit code, global rank of the first process that failed on its own) for how the launcher ended: -N for a
    process that signal N killed (as subprocess gives it), so that one is told from a process that exited with 128 + N
    on its own (a recipe stopped by Ctrl-C exits 130 after its checkpoint)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if error is None:
        return 0, None
    if isinstance(error, SystemExit):  # accelerate's launcher with --quiet exits 1 for any failure
        return (error.code if isinstance(error.code, int) else 1), 0
    if isinstance(error, subprocess.CalledProcessError):  # the one-process launcher: the recipe's own status
        return error.returncode, 0
    if isinstance(error, ChildFailedError):
        # The first process that ended on its own decides: by its own exit status, or killed from outside (SIGKILL:
        # the out-of-memory killer, kill -9), whereupon the others stop with "lost contact". Those the launcher then
        # killed at teardown (SIGTERM) are consequences. Ties in the launcher's 1-second timestamps go to a killed
        # process, then to the lowest rank.
        def order(item):
            rank, failure = item
            killed = failure.exitcode == -signal.SIGKILL
            return (failure.exitcode < 0 and not killed, failure.timestamp, not killed, rank)

        rank, failure = min(error.failures.items(), key=order)
        return failure.exitcode, rank
    raise error


def as_status(code: int) -> int:
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


def killed_line(code: int, rank: int | None) -> str | None:
    """The line for a process that a signal killed before it could say why (its exit code is -N)."""
    if code >= 0 or -code not in signal.valid_signals():
        return None
    name, resume = signal.Signals(-code).name, "run the same command with --resume_from_checkpoint latest to continue"
    if name == "SIGKILL":
        cause, advice = (
            "the kernel's out-of-memory killer or a kill -9",
            f"if memory ran out, lower the batch or the model; {resume}",
        )
    else:
        cause, advice = "a signal from outside", resume
    return f"error: rank {rank or 0} was killed by {name} ({cause}), exit status {as_status(code)}: {advice}"


def report_errors(error_dir: Path, first_rank: int | None, code: int) -> None:
    """A killed process's line, then each distinct error line of the processes once, the first failing
    process's first."""
    if line := killed_line(code, first_rank):  # on a line of its own: the killed process left its progress bar open
        print("\n" + line, file=sys.stderr, flush=True)
    files = sorted(error_dir.glob("rank-*"), key=lambda p: (p.name != f"rank-{first_rank}", int(p.name[5:])))
    lines = dict.fromkeys(line for p in files for line in p.read_text().splitlines() if line.strip())
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def quiet_launcher_logs() -> None:
    """torch's elastic agent logs each failed process and each signal it sends; the exit status says it all."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # loggers torch creates later read it
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class SignalRelay:
    """The signals a run keeps, held from the moment accel-dp starts (`listen`) until its processes have exited.

    SIGTERM, SIGUSR1 and SIGHUP (preemption, Slurm's --signal, a closed terminal) reach every process at once as
    SIGTERM, and Ctrl-C as SIGINT (to the processes outside this one's process group: the terminal signalled the
    others itself); a process started after the signal gets it when it appears. A second Ctrl-C is passed on again
    (the recipes then stop at once). A process the signal killed before it could keep it (still importing) had not
    begun training: nothing is lost, and the run ends as preempted (75) or interrupted (130). Before anything is
    launched, or while the launcher still waits for other nodes that never come, the run ends at once.

    Under restarts (`restarts_in`: accel-dp's folder for the run's lines), the signal is recorded there as the run's
    ending (ended-runner), and passed on only to the processes that keep signals (each says so there, listening-PID):
    one still importing would die of it and be restarted; it, and any process that starts later, finds the record
    and ends alike."""

    GIVE_UP_WAITING_S = 3.0  # a signal with no process started this long after it: the launcher is waiting for nodes

    def __init__(self) -> None:
        self.pending: signal.Signals | None = None  # what to pass on: SIGTERM (a preemption) or SIGINT (Ctrl-C)
        self.received_at = 0.0
        self.told: set[int] = set()
        self.started_any = False
        self.previous: dict = {}
        self.restarts_in: Path | None = None

    def listen(self) -> None:
        if self.previous:
            return
        self.previous = {
            sig: signal.signal(sig, self.preempt) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
        }
        self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.interrupt)

    def stop_listening(self) -> None:
        """The handlers from before `listen` back, and nothing pending (a caller may run again in this process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous, self.pending, self.told, self.started_any, self.restarts_in = {}, None, set(), False, None

    def preempt(self, signum, frame) -> None:
        self.receive(signal.SIGTERM)

    def interrupt(self, signum, frame) -> None:
        if self.pending == signal.SIGINT:  # the second Ctrl-C: every process hears it again, and stops at once
            self.told.clear()
        self.receive(signal.SIGINT)

    def receive(self, sig: signal.Signals) -> None:
        if self.pending is None or sig == signal.SIGINT:
            self.pending, self.received_at = sig, time.monotonic()
        if self.restarts_in is not None:
            code = INTERRUPTED_EXIT_CODE if self.pending == signal.SIGINT else PREEMPTED_EXIT_CODE
            (self.restarts_in / "ended-runner").write_text(str(code))
        self.pass_on()

    def pass_on(self, to_newcomers: bool = True) -> None:
        """Send the pending signal to each process that has not had it (a no-op with none pending, or for processes
        started since the signal when not `to_newcomers`)."""
        import psutil

        children = psutil.Process().children(recursive=self.pending == signal.SIGINT)
        self.started_any = self.started_any or bool(children)
        if self.pending is None or not to_newcomers:
            return
        if self.restarts_in is not None:  # only those that keep signals (the others, still importing, find the record)
            listening = {int(p.name.removeprefix("listening-")) for p in self.restarts_in.glob("listening-*")}
            children = [child for child in children if child.pid in listening]
        own_group = os.getpgid(0)
        for child in children:
            if child.pid in self.told:
                continue
            try:
                if self.pending == signal.SIGTERM or os.getpgid(child.pid) != own_group:
                    child.send_signal(self.pending)
                self.told.add(child.pid)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass

    def gave_up_waiting(self) -> bool:
        """A signal came and no process was started since: nothing runs that could keep it."""
        return (
            self.pending is not None
            and not self.started_any
            and time.monotonic() - self.received_at > self.GIVE_UP_WAITING_S
        )

    def ending(self, code: int) -> tuple[int, str | None]:
        """The run's exit code, and a line when the signal decided it: a process it killed before the process could
        keep it, or a run stopped before any process started."""
        if self.pending is None or (code != -self.pending and self.started_any):
            return code, None
        how, code = ("interrupted (Ctrl-C)", INTERRUPTED_EXIT_CODE)
        if self.pending == signal.SIGTERM:
            how, code = ("preempted (SIGTERM)", PREEMPTED_EXIT_CODE)
        return code, (
            f"accel-dp: {how} before training began: nothing to save since the last checkpoint, if any; run the same "
            "command again (with --resume_from_checkpoint latest to continue from a checkpoint)"
        )


RELAY = SignalRelay()  # one per process: `accel-dp` starts listening before its imports, run() until it returns


def run(launch_args: list[str], env: dict[str, str] | None = None) -> int:
    """Run `accelerate launch launch_args` with `env` added to the environment; return the recipe's exit status."""
    RELAY.listen()
    try:
        return launch_and_wait(launch_args, env)
    finally:
        RELAY.stop_listening()


def launch_and_wait(launch_args: list[str], env: dict[str, str] | None) -> int:
    if RELAY.pending is not None:  # a signal before anything started
        code, line = RELAY.ending(-RELAY.pending)
        print(line, file=sys.stderr, flush=True)
        return code
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args, min_nodes = node_range(launch_args)
    args = launch_command_parser().parse_args(launch_args)
    if args.max_restarts and args.num_machines in (None, 1):
        # torchrun's standalone rendezvous (c10d, a fresh endpoint and id), and a store of their own for the processes
        # of each attempt: the static rendezvous accelerate picks keeps one store for every attempt, and the
        # restarted processes read their peers' old addresses from it and wait for them (pytorch/pytorch#167288).
        args.standalone = True
    own_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if args.max_restarts else {}
    error_dir = Path(tempfile.mkdtemp(prefix="accel-dp-errors-"))
    RELAY.restarts_in = error_dir if args.max_restarts else None
    environment = dict(os.environ)  # given back at the end: a caller in the same process keeps its own
    os.environ.update({**own_store, **(env or {}), ERROR_DIR_VARIABLE: str(error_dir)})
    quiet_launcher_logs()
    outcome: dict[str, BaseException] = {}

    def launch() -> None:
        try:
            launch_command(args) if min_nodes is None else launch_elastic(args, min_nodes)
        except BaseException as error:  # judged in the main thread
            outcome["error"] = error

    # (A KeyboardInterrupt here would end the join below at once: on Python 3.11 an interrupted join marks the thread
    # finished, CPython gh-90882. Ctrl-C is the relay's.)
    launcher = threading.Thread(target=launch, name="accelerate-launch", daemon=True)
    try:
        launcher.start()
        while launcher.is_alive() and not RELAY.gave_up_waiting():
            launcher.join(0.5)  # returns now and then, so that signals are handled here at once
            RELAY.pass_on(to_newcomers=not args.max_restarts)  # (a process started since the signal)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    if launcher.is_alive():  # still waiting for nodes that never came: nothing was started
        outcome["error"] = subprocess.CalledProcessError(-RELAY.pending, "accelerate launch")
    try:
        code, first_rank = exit_status(outcome.get("error"))
    except BaseException as error:  # the launcher failed on its own: its traceback, as accelerate would show it
        traceback.print_exception(error)
        code, first_rank = 1, None
    code, line = RELAY.ending(code)
    if (ended := ended_on_purpose(error_dir)) is not None:  # under restarts: the recipes exited 0 and said so here
        code, first_rank = ended
        said_why = first_rank is not None or any(error_dir.glob("rank-*"))  # (a process that ended said how)
        line = RELAY.ending(-RELAY.pending)[1] if RELAY.pending and not said_why else None
    report_errors(error_dir, first_rank, code)
    for said in (line, gave_up(error_dir, args.max_restarts, code, ended is not None)):
        if said:
            print(said, file=sys.stderr, flush=True)
    shutil.rmtree(error_dir, ignore_errors=True)
    return as_status(code)


def node_range(launch_args: list[str]) -> tuple[list[str], int | None]:
    """`--num_machines MIN:MAX` (accel-dp's one addition to accelerate's arguments: torchrun's --nnodes range) as
    accelerate's `--num_machines MAX`, and MIN (None for a plain count)."""
    if "--num_machines" not in launch_args[:-1]:
        return launch_args, None
    at = launch_args.index("--num_machines") + 1
    low, colon, high = launch_args[at].partition(":")
    if not colon:
        return launch_args, None
    return [*launch_args[:at], high, *launch_args[at + 1 :]], int(low)


def launch_elastic(args, min_nodes: int) -> None:
    """accelerate's multi-process launch, with torchrun's node range (--nnodes MIN:MAX) that accelerate's launcher
    cannot pass on: accelerate's settings and environment for the processes, then torch's elastic agent over a c10d
    rendezvous hosted by the main node. Every node's command names the same rendezvous (its id: the main node's
    address and the training command)."""
    import hashlib

    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _validate_launch_command  # (the config file's defaults; no public name)
    from accelerate.utils import patch_environment, prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(args)
    environment = prepare_multi_gpu_env(args)
    address = f"{args.main_process_ip}:{args.main_process_port}"
    command = " ".join([address, args.training_script, *args.training_script_args])
    args.nnodes, args.rdzv_backend, args.rdzv_endpoint = f"{min_nodes}:{args.num_machines}", "c10d", address
    args.rdzv_id = "accel-dp-" + hashlib.sha256(command.encode()).hexdigest()[:12]
    torchrun_args = torchrun.get_args_parser().parse_args([args.training_script, *args.training_script_args])
    for key, value in vars(args).items():
        if key in vars(torchrun_args):
            setattr(torchrun_args, key, value)
    with patch_environment(**environment):
        torchrun.run(torchrun_args)


def ended_on_purpose(error_dir: Path) -> tuple[int, int | None] | None:
    """(code, rank) of an ending no restart mends, as a process recorded it (ended-RANK) or this runner after a
    signal (ended-runner): the lowest rank's."""
    found = sorted(error_dir.glob("ended-*"), key=lambda p: (not p.name[6:].isdigit(), p.name[6:].zfill(9)))
    if not found:
        return None
    rank = found[0].name[6:]
    return int(found[0].read_text() or 1), int(rank) if rank.isdigit() else None


def gave_up(error_dir: Path, max_restarts: int, code: int, on_purpose: bool) -> str | None:
    """After a failure that restarts could mend but did not: how many restarts the run used."""
    if not max_restarts or code == 0 or on_purpose:
        return None
    used = len(list(error_dir.glob("attempt-*")))
    return f"accel-dp: the run failed after {used} restart(s) of the {max_restarts} allowed (--max-restarts)"


if __name__ == "__main__":
    RELAY.listen()  # (before accelerate's imports: a signal in the first second is kept too)
    sys.exit(run(sys.argv[1:]))
