"""The recipe registry: every recipes/<name>.py that names itself with `RECIPE = "<name>"` is a recipe (underscores
as dashes). The other files in recipes/ are the modules recipes import as siblings (the run kit, the token cache...),
never offered as recipes.

Descriptions and imports are read from the source without importing it; the flags a recipe accepts are asked of its
own argument parser (its --help), so that flags its modules add count too."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .bundle import recipes_dir
from .errors import UsageError


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path

    @property
    def description(self) -> str:
        docstring = ast.get_docstring(_tree(self.path)) or ""
        return docstring.strip().splitlines()[0] if docstring.strip() else ""

    def modules(self) -> list[Path]:
        """The modules beside the recipe that it imports, directly or through one another, or names as a file
        (glue-bert loads its evaluate metric, glue_metric.py, by path)."""
        found, pending = [], [self.path]
        while pending:
            for name in _imported_names(pending.pop()):
                module = self.path.parent / f"{name}.py"
                if module.is_file() and module != self.path and module not in found:
                    found.append(module)
                    pending.append(module)
        return sorted(found)

    def accepts_flag(self, flag: str) -> bool:
        """Whether the recipe's argument parser defines `flag`."""
        return flag in _parser_flags(self.path, self.path.stat().st_mtime)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+\.py", node.value):
            names.add(node.value.removesuffix(".py"))
    return names


def _recipe_name(path: Path) -> str | None:
    """The name a file declares with a top-level `RECIPE = "..."`, or None for a module."""
    for node in _tree(path).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "RECIPE" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    return None


@functools.cache
def _parser_flags(path: Path, mtime: float) -> frozenset[str]:
    """The option strings in the recipe's --help, run in a child process (importing a recipe costs seconds of
    torch and transformers, and would run its module-level code in this one)."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise UsageError(f"{path.name} --help failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return frozenset(re.findall(r"^\s+(?:-\w(?: \S+)?, )?(--[\w-]+)", done.stdout, re.MULTILINE))


def list_recipes(directory: Path | None = None) -> list[Recipe]:
    directory = directory or recipes_dir()
    paths = [p for p in sorted(directory.glob("*.py")) if not p.stem.startswith("_")]
    return [Recipe(p.stem.replace("_", "-"), p) for p in paths if _recipe_name(p)]


def get_recipe(name: str, directory: Path | None = None) -> Recipe:
    recipes = list_recipes(directory)
    wanted = name.replace("_", "-").removesuffix(".py")
    for recipe in recipes:
        if recipe.name == wanted:
            return recipe
    known = ", ".join(r.name for r in recipes)
    raise UsageError(f"unknown recipe {name!r}: choose one of {known} (see `accel-dp list`)")
