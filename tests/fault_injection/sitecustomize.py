"""Fault injection for tests/test_faults.py: Python imports this module at start-up when its folder is on PYTHONPATH.

With ACCEL_DP_FAULT_PHASE set, the recipe process that builds the token cache, or rank 0, delivers
ACCEL_DP_FAULT_SIGNAL once it reaches that phase of a run, the way a user or a machine would: SIGINT to the
process group of `accel-dp run` (Ctrl-C at its terminal), SIGTERM to `accel-dp run` (a preemption), SIGKILL to the
last rank (the out-of-memory killer). Phases: cache (tokenizing the corpus), first_step (the data and model ready,
nothing trained), training (the third optimizer step), checkpoint (save_state written, its manifest not yet),
eval (an evaluation begins), final_save (the trained model being saved). Nothing here runs without the variable.
"""

import importlib.abc
import os
import signal
import sys

PHASE, SIGNAL = os.environ.get("ACCEL_DP_FAULT_PHASE"), os.environ.get("ACCEL_DP_FAULT_SIGNAL")


def deliver() -> None:
    if os.environ.get("RANK", "0") != "0" or os.environ.get("ACCEL_DP_FAULT_DONE"):
        return
    os.environ["ACCEL_DP_FAULT_DONE"] = "1"
    import psutil

    runner = next(p.pid for p in psutil.Process().parents() if "accel_dp.cli" in " ".join(p.cmdline()))
    if SIGNAL == "SIGINT":
        os.killpg(os.getpgid(runner), signal.SIGINT)
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
            deliver()
        result = original(*args, **kwargs)
        if after and at(*args, **kwargs):
            deliver()
        return result

    setattr(owner, name, wrapper)


def patch(module) -> None:
    if module.__name__ == "token_cache" and PHASE == "cache":
        wrap(module.TokenFile, "write")
    if module.__name__ != "run_kit":
        return
    if PHASE == "first_step":
        wrap(module.Run, "begin")
    elif PHASE == "training":
        wrap(module.Run, "step_done", at=lambda run, step, result: step == 3, after=True)
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
