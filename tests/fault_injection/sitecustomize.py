"""Fault injection for tests/test_faults.py: Python imports this module at start-up when its folder is on PYTHONPATH.

With ACCEL_DP_FAULT_PHASE set, the recipe process that builds the token cache, or local rank 0, delivers
ACCEL_DP_FAULT_SIGNAL once it reaches that phase of a run, the way a user or a machine would: SIGINT to the
process group of `accel-dp run` (Ctrl-C at its terminal), SIGTERM to `accel-dp run` (a preemption), SIGKILL to the
last rank (the out-of-memory killer). Phases: cache (tokenizing the corpus), first_step (the data and model ready,
nothing trained), training (the third optimizer step), checkpoint (save_state written, its manifest not yet),
eval (an evaluation begins), final_save (the trained model being saved). Nothing here runs without the variable.

With ACCEL_DP_FAULT_PHASE=enospc, the disk fills at one write instead: the ACCEL_DP_FAULT_NTH-th (default 1st) file
rank 0 opens for writing whose name is ACCEL_DP_FAULT_FILE (metrics.jsonl, training_state.json, latest.partial,
all_results.json.partial), or the ACCEL_DP_FAULT_NTH-th safetensors file it saves under a folder whose name starts with
ACCEL_DP_FAULT_FILE (step-: a checkpoint's weights; final-model: the final model's). Half of what was being written
reaches the file, then the write fails with ENOSPC, as on a full disk; the disk is free again afterwards.

Under restarts (accel-dp run --max-restarts), the fault comes in the first attempt only, or in every attempt with
ACCEL_DP_FAULT_EVERY_ATTEMPT=1; in the training phase, at the third step the process trains. Two more faults for
nodes (tests/test_restarts.py): ACCEL_DP_FAULT_SIGNAL=SIGKILL_LAUNCHER kills this node's `accel-dp run` alone (its
first process delivers it), and HOLD keeps rank 0 at that step until a signal comes.
"""

import builtins
import errno
import importlib.abc
import io
import os
import signal
import sys
import time

PHASE, SIGNAL = os.environ.get("ACCEL_DP_FAULT_PHASE"), os.environ.get("ACCEL_DP_FAULT_SIGNAL")
FULL_AT, NTH = os.environ.get("ACCEL_DP_FAULT_FILE", ""), int(os.environ.get("ACCEL_DP_FAULT_NTH", "1"))
seen = {"writes": 0}


def disk_fills_now(path) -> bool:
    """Whether this write is the one that meets a full disk (once, on rank 0)."""
    if os.environ.get("RANK", "0") != "0" or os.environ.get("ACCEL_DP_FAULT_DONE"):
        return False
    seen["writes"] += 1
    if seen["writes"] < NTH:
        return False
    os.environ["ACCEL_DP_FAULT_DONE"] = "1"
    return True


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class FillingFile:
    """A file open for writing whose next write gets half its bytes onto the disk, then ENOSPC."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise no_space(self._file.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def fill_the_disk() -> None:
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        writing = any(m in mode for m in "wax")
        if writing and os.path.basename(str(file)) == FULL_AT and disk_fills_now(file):
            return FillingFile(opened)
        return opened

    builtins.open = io.open = open_  # (pathlib's write_text calls io.open)


def fill_the_disk_at_safetensors() -> None:
    """safetensors writes in Rust: its save_file, wherever a library imported it, fails on the chosen folder."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if os.path.basename(os.path.dirname(str(filename))).startswith(FULL_AT) and disk_fills_now(filename):
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise no_space(filename)

    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is real:
                setattr(module, name, save_file)


def deliver(run=None, *args) -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0":  # (the first process of the node the variables were given to)
        return
    if os.environ.get("ACCEL_DP_FAULT_DONE"):
        return
    again = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or getattr(run, "first_step", 0)
    if again and SIGNAL != "SIGKILL_LAUNCHER" and not os.environ.get("ACCEL_DP_FAULT_EVERY_ATTEMPT"):
        return  # (a restart, or a group re-formed when a node joined: the first attempt only, unless asked)
    os.environ["ACCEL_DP_FAULT_DONE"] = "1"
    import psutil

    runner = next(p.pid for p in psutil.Process().parents() if " -m accel_dp run " in f" {' '.join(p.cmdline())} ")
    if SIGNAL == "SIGINT":
        os.killpg(os.getpgid(runner), signal.SIGINT)
    elif SIGNAL == "SIGKILL_LAUNCHER":  # this node's accel-dp run, alone
        os.kill(runner, signal.SIGKILL)
    elif SIGNAL == "HOLD":  # until a signal comes (a node joining: torch's agent stops the group), 2 minutes at most
        deadline = time.monotonic() + 120
        while run.signals.received is None and time.monotonic() < deadline:
            time.sleep(0.05)
    elif SIGNAL == "SIGTERM":
        os.kill(runner, signal.SIGTERM)
    else:  # SIGKILL of the last rank
        last = str(int(os.environ.get("WORLD_SIZE", "1")) - 1)
        for process in psutil.Process(runner).children(recursive=True):
            try:
                if process.environ().get("RANK", "0") == last and "python" in process.name():
                    process.kill()
                    return
            except psutil.Error:
                pass


def wrap(owner, name, at=lambda *args, **kwargs: True, after=False):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not after and at(*args, **kwargs):
            deliver(*args)
        result = original(*args, **kwargs)
        if after and at(*args, **kwargs):
            deliver(*args)
        return result

    setattr(owner, name, wrapper)


def patch(module) -> None:
    if module.__name__ == "token_cache" and PHASE == "cache":
        wrap(module.TokenFile, "write")
    if module.__name__ != "run_kit":
        return
    if PHASE == "enospc" and FULL_AT in ("step-", "final-model"):
        original_begin = module.Run.begin

        def begin(*args, **kwargs):  # by now every library that saves safetensors is imported
            fill_the_disk_at_safetensors()
            return original_begin(*args, **kwargs)

        module.Run.begin = begin
    elif PHASE == "enospc":
        fill_the_disk()
    elif PHASE == "first_step":
        wrap(module.Run, "begin")
    elif PHASE == "training":
        wrap(module.Run, "step_done", at=lambda run, step, result: step == run.first_step + 3, after=True)
    elif PHASE == "checkpoint":
        import accelerate

        wrap(accelerate.Accelerator, "save_state", after=True)
    elif PHASE == "eval":
        wrap(module.Run, "evaluation")
    elif PHASE == "final_save":
        wrap(module, "save_model")


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Lets run_kit and token_cache load as usual, then patches them."""

    def find_spec(self, name, path=None, target=None):
        if name not in ("run_kit", "token_cache"):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if PHASE:
    import importlib.util

    sys.meta_path.insert(0, PatchAfterImport())
