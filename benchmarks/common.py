"""Helpers the benchmark scripts share (each script is run as `python benchmarks/<name>.py`, so this folder is on
sys.path and `from common import ...` works)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# The recipes import their modules (checkpointing, metering, token_cache, ...) as siblings, as `python recipes/x.py`
# finds them; benchmarks import them by the same names.
sys.path.insert(0, str(RECIPES_DIR))


def warn_if_busy(what: str = "these timings are not a measurement") -> None:
    """Other work on the cores skews the timings: say so."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: other work shares the cores, so {what}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_module(name: str):
    """One of the modules beside the recipes (checkpointing, metering, token_cache, ...), as the recipes import it."""
    return importlib.import_module(name)


def load_recipe(path: Path | str):
    """A recipe imported from its file as a module (its functions and classes; main() does not run). `path`: a file,
    or a recipe's name in recipes/ (gpt_pretrain, glue_bert)."""
    path = Path(path) if str(path).endswith(".py") else RECIPES_DIR / f"{path}.py"
    if str(path.parent) not in sys.path:  # a recipe elsewhere: its own modules first
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_bench_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
