"""How a run ends: the exit codes, the one line an error gets, the signals a run keeps, and the one place a process
leaves.

The other modules never exit: bad input calls `fail` and a failure during training `stop`, which print the line and
raise SystemExit with the code; a signal is remembered by `StopSignals` and acted on by the run at its next log step.
`run_main(main, recipe)`, a recipe's last line, runs main() and is where the process leaves: with several processes
at once (os._exit once the output is flushed), and when a peer is lost, with one line naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
from accelerate import Accelerator
from messages import first_line, logger
from tqdm.auto import tqdm

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL, "try again": a checkpoint was written; rerun to resume
FAILED_EXIT_CODE = 1  # stopped during training (a lost process, a NaN): nothing was overwritten
BAD_INPUT_EXIT_CODE = 2  # refused before any work: nothing was written
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT, as a shell reports it): a checkpoint if the run makes them
ERROR_DIR_VARIABLE = "ACCEL_DP_ERROR_DIR"  # set by `accel-dp run`, which prints each process's error line once
# Errors of a collective whose peer is gone. gloo raises a plain RuntimeError (no DistError subclass; checked with
# torch 2.13), so the text is all there is to tell a lost peer from a bug.
LOST_PEER_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")
_before_leaving: list[Callable[[], None]] = []


def before_leaving(callback: Callable[[], None]) -> None:
    """Have `callback` run when the process leaves, however the run ended (the run folder's lock is released so)."""
    _before_leaving.append(callback)


@contextlib.contextmanager
def undone_if_leaving(undo: Callable[[], None]):
    """Run `undo` if the process leaves from inside the block (a failed write, a lost peer), and not once the block
    has finished."""
    _before_leaving.append(undo)
    yield
    _before_leaving.remove(undo)


def report_error(message: str) -> None:
    """One line that says what is wrong and what to do. Under `accel-dp run` it goes to a file of this process's, and
    accel-dp prints each distinct line once for all processes."""
    if folder := error_folder():
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(f"error: {message}\n")
    else:
        tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line, under any progress bar


def fail(message: str) -> NoReturn:
    """Bad input, found before any work: the line, then exit status 2."""
    report_error(message)
    raise SystemExit(BAD_INPUT_EXIT_CODE)


def stop(message: str) -> NoReturn:
    """A failure during training (not bad input): the line, then exit status 1."""
    report_error(message)
    raise SystemExit(FAILED_EXIT_CODE)


class StopSignals:
    """The signals that end a run cleanly, remembered from the moment the run starts; the handlers are installed here
    and nowhere else. SIGTERM (preemption; torchrun passes it to every rank), SIGUSR1 (Slurm's --signal) and SIGHUP (a
    closed terminal or SSH session) make the run checkpoint and exit 75. Ctrl-C (SIGINT) stops at once while the
    data and the model are being prepared (a token cache can take minutes); once training has begun
    (`training_began`), the first Ctrl-C is kept like a preemption (a checkpoint if the run makes them, exit 130)
    and a second one stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferring_ctrl_c = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if folder := error_folder():  # under restarts, accel-dp signals only the processes that keep signals
            Path(folder, f"listening-{os.getpid()}").touch()
            said = Path(folder, "ended-runner")  # (or records the signal: for a process that came too late for it)
            if said.is_file():
                self._on_signal(
                    signal.SIGINT if said.read_text() == str(INTERRUPTED_EXIT_CODE) else signal.SIGTERM, None
                )

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and (not self.deferring_ctrl_c or self.received == "SIGINT"):
            raise KeyboardInterrupt  # before training, or the second Ctrl-C: now (run_main reports it)
        self.received = signal.Signals(signum).name

    def training_began(self) -> None:
        self.deferring_ctrl_c = True

    def anywhere(self, accelerator: Accelerator) -> bool:
        """Whether any process has received a signal: a collective (accelerate's trigger), so every process must ask,
        at the same steps."""
        if self.received:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    @property
    def interrupted(self) -> bool:
        return self.received == "SIGINT"

    @property
    def restart_follows(self) -> bool:
        """Whether the SIGTERM came from torch's elastic agent, which stops every process of the group before it
        restarts it (a node joined, or a process failed). Under accel-dp's restarts a signal from outside is recorded
        by accel-dp (ended-runner) before it is passed on; asked after the checkpoint, when it has been."""
        folder = error_folder()
        return (
            self.received == "SIGTERM"
            and folder is not None
            and Attempt.now().max_restarts > 0
            and not (folder / "ended-runner").exists()
        )

    def describe(self) -> str:
        if self.interrupted:
            return "interrupted (Ctrl-C)"
        if self.restart_follows:
            return "stopped by torch's elastic agent to re-form the group"
        return f"preempted ({self.received or 'a signal to another rank'})"

    def stop_if_any_before_training(self, accelerator: Accelerator, recipe: str) -> None:
        """Preempted before the first step: nothing to save yet, so the run ends (a collective, as `anywhere`)."""
        if self.anywhere(accelerator):
            accelerator.end_training()
            message = f"{recipe}: {self.describe()} before training began: nothing to save"
            self.end_run(message, then=", run the same command again")

    def end_run(self, message: str, then: str = "") -> NoReturn:
        """The run's last line after a signal, with the exit status it ends with (130 after Ctrl-C, else 75)."""
        code = INTERRUPTED_EXIT_CODE if self.interrupted else PREEMPTED_EXIT_CODE
        if self.restart_follows:
            logger.info(message)
            raise Restarting(code)
        logger.info(f"{message}; exit status {code}{then}")
        raise SystemExit(code)


class Restarting(SystemExit):
    """The process ends so that torch's elastic agent can restart the group: the run goes on."""


def run_before_leaving() -> None:
    while _before_leaving:
        try:
            _before_leaving.pop()()
        except Exception as error:  # a cleanup never hides how the run ended
            logger.warning(f"while leaving: {type(error).__name__}: {first_line(error)}")


class Attempt(NamedTuple):
    """Which attempt at the run this process belongs to, under torch's elastic agent (`torchrun --max-restarts N`,
    `accel-dp run --max-restarts N`), which restarts every process of a run when one fails: 0 for the first."""

    number: int
    max_restarts: int
    nodes: int = 1  # the machines of this attempt's group (torchrun's GROUP_WORLD_SIZE)

    @classmethod
    def now(cls) -> Attempt:
        return cls(
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)),
            int(os.environ.get("GROUP_WORLD_SIZE", 1)),
        )

    @property
    def may_restart(self) -> bool:
        """Whether the agent restarts the run if this attempt fails."""
        return self.number < self.max_restarts

    def previous_ending(self) -> str:
        """Why the attempt before this one ended: its first error line (under accel-dp run), else what is known."""
        folder = error_folder()
        lines = sorted(folder.glob(f"attempt-{self.number - 1}/rank-*")) if folder else []
        said = [line.removeprefix("error: ") for p in lines for line in p.read_text().splitlines() if line.strip()]
        # (the line's advice, to resume by hand, is for a run that is not restarted)
        return said[0].split("; ")[0] if said else "a process ended without a word (killed: SIGKILL, out of memory)"

    def set_aside_previous_lines(self) -> None:
        """The attempt before's error lines into attempt-N/ (once per machine): accel-dp prints the last attempt's."""
        folder = error_folder()
        if folder and self.number and os.environ.get("LOCAL_RANK", "0") == "0":
            aside = folder / f"attempt-{self.number - 1}"
            aside.mkdir(exist_ok=True)
            for said in folder.glob("rank-*"):
                said.rename(aside / said.name)


def error_folder() -> Path | None:
    folder = os.environ.get(ERROR_DIR_VARIABLE)
    return Path(folder) if folder and os.path.isdir(folder) else None


def ended_on_purpose() -> int | None:
    """The exit code of an ending no restart mends (bad input, a signal, a NaN), as a process of this run or accel-dp
    recorded it (ended-*), if any has."""
    folder = error_folder()
    codes = [int(p.read_text() or FAILED_EXIT_CODE) for p in sorted(folder.glob("ended-*"))] if folder else []
    return codes[0] if codes else None


def run_main(main: Callable, recipe: str) -> None:
    """Run a recipe's main() and leave the way the run ended. When a process dies (a killed node, out of memory), every
    collective of the others fails, or times out after --ddp_timeout: name the lost rank in one line and exit at once,
    rather than hang or print a wall of C++. Under restarts, an attempt after one that ended on purpose ends alike."""
    die_with_launcher()
    attempt = Attempt.now()
    attempt.set_aside_previous_lines()
    if ended_on_purpose() is not None:  # (the process or accel-dp that ended it has recorded how, and said so)
        leave(0)
    try:
        main()
        if several_processes():
            leave(0)  # (gloo's C++ teardown at interpreter exit can abort a finished run, status 134)
        run_before_leaving()
    except SystemExit as ended:  # fail, stop, or a signal's end_run: the line is out
        leave(ended.code if isinstance(ended.code, int) else FAILED_EXIT_CODE, mendable=isinstance(ended, Restarting))
    except KeyboardInterrupt:  # Ctrl-C before training began (the token cache, the model), or a second one
        report_error("interrupted (Ctrl-C): stopped at once; nothing half-written was kept")
        leave(INTERRUPTED_EXIT_CODE)
    except Exception as error:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            run_before_leaving()
            raise  # one process: its traceback says it all
        rank, text = dist.get_rank(), str(error)
        lost_peer = isinstance(error, dist.DistError) or any(s in text for s in LOST_PEER_ERRORS)
        if not lost_peer:  # this process's own failure: say it, so that its peers' "lost contact" is not all we see
            report_error(f"rank {rank}: {type(error).__name__}: {first_line(error, 300)}")
            traceback.print_exc()
        elif not peer_said_why(rank):  # (a peer that stopped with a line of its own, bad input or a crash, tells it)
            # gloo's text quotes its C++ source and a cut-off sentence: name what happened, not where.
            reason = next((s for s in LOST_PEER_ERRORS if s in text), type(error).__name__)
            report_error(
                f"rank {rank}: lost contact with {lost_ranks(recipe, rank, dist.get_world_size())} "
                f"({reason.lower()}); stopping. Resume with --resume_from_checkpoint latest once all nodes are back"
            )
        leave(FAILED_EXIT_CODE, mendable=True)  # without teardown: destroying a group with a dead peer can hang


def leave(code: int, mendable: bool = False) -> NoReturn:
    """Exit with `code`: the only place a run's process exits. With several processes, at once (os._exit, once the
    output is flushed), finished or not: one whose process group is torn down while a peer closes its connections can
    abort in torch's C++ teardown at interpreter exit ("terminate called without an active exception", status 134)
    and lose the code, even after destroy_process_group and end_training (seen after a finished 2-process run, and on
    a preemption before the first step).

    Under torch's elastic agent with restarts left, an ending a restart cannot mend (not `mendable`: bad input, a
    signal, a NaN, a full disk) is recorded in accel-dp's folder (ended-RANK) and the process exits 0, or the agent
    would restart it; accel-dp then exits with the code. A lost peer or a crash exits as it is, and is restarted."""
    run_before_leaving()
    if code and not mendable and Attempt.now().may_restart and (folder := error_folder()):
        Path(folder, f"ended-{os.environ.get('RANK', '0')}").write_text(str(code))
        code = 0
    if several_processes():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def die_with_launcher() -> None:
    """A process that torch's elastic agent started dies with the agent (Linux: the kernel's parent-death signal), as
    the processes of a lost machine do. Orphaned, it would go on training with the other nodes, which then never see
    its node leave, and wait for it at the end."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the agent was gone before the call
        os._exit(FAILED_EXIT_CODE)


def several_processes() -> bool:
    """Whether this process is one of several of a run (its launcher says so, or a process group is up)."""
    dist = torch.distributed
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())


def peer_said_why(rank: int, wait_s: float = 1.0) -> bool:
    """Whether another process has written its error line (under accel-dp run), waiting a moment for it: one that
    stops on its own writes it before it leaves, and the others lose contact with it only then."""
    error_dir = os.environ.get(ERROR_DIR_VARIABLE)
    deadline = time.monotonic() + wait_s
    while error_dir and os.path.isdir(error_dir):
        if any(p.name != f"rank-{rank}" for p in Path(error_dir).glob("rank-*")):
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return False


def lost_ranks(recipe: str, rank: int, world_size: int) -> str:
    """Who is gone: the other one of two; of more, the survivors check in with the launcher's rendezvous store, and
    whoever does not is lost."""
    if world_size == 2:
        return f"rank {1 - rank}"
    try:
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10)
        )
        store.set(f"{recipe}/alive/{rank}", "1")
        time.sleep(3)
        lost = [r for r in range(world_size) if not store.check([f"{recipe}/alive/{r}"])]
        return "rank " + ", ".join(map(str, lost)) if lost else "another process"
    except Exception:  # the store lives with rank 0's launcher: that node is gone
        return "rank 0 (the main node)"
