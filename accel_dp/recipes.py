"""The recipe registry: every recipes/<name>.py is a recipe called <name> with underscores as dashes.

A recipe's description is the first line of its module docstring, read without importing it."""

from __future__ import annotations

import ast
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
        docstring = ast.get_docstring(ast.parse(self.path.read_text(encoding="utf-8"))) or ""
        return docstring.strip().splitlines()[0] if docstring.strip() else ""

    def accepts_flag(self, flag: str) -> bool:
        """Whether the recipe's argument parser defines `flag` (read from its source, without importing it)."""
        return f'"{flag}"' in self.path.read_text(encoding="utf-8")


def list_recipes(directory: Path | None = None) -> list[Recipe]:
    directory = directory or recipes_dir()
    return [Recipe(p.stem.replace("_", "-"), p) for p in sorted(directory.glob("*.py")) if not p.stem.startswith("_")]


def get_recipe(name: str, directory: Path | None = None) -> Recipe:
    recipes = list_recipes(directory)
    wanted = name.replace("_", "-").removesuffix(".py")
    for recipe in recipes:
        if recipe.name == wanted:
            return recipe
    known = ", ".join(r.name for r in recipes)
    raise UsageError(f"unknown recipe {name!r}: choose one of {known} (see `accel-dp list`)")
