"""The run kit: the section of plumbing that every recipe carries byte for byte (like transformers' `# Copied from`).

    python tests/run_kit.py          # copy recipes/gpt_pretrain.py's kit onto every other recipe (`make kit`)
    python tests/run_kit.py --check  # exit 1, with a diff, if a recipe's kit differs from gpt_pretrain.py's

tests/test_run_kit.py runs the check. The kit runs from the line that ends with "== run kit" to the one that ends
with "== end of run kit"; gpt_pretrain.py holds the copy to edit.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SOURCE = RECIPES_DIR / "gpt_pretrain.py"
BEGIN, END = "== run kit", "== end of run kit"


def kit_bounds(text: str, path: Path) -> tuple[int, int]:
    """Character offsets of the kit section: its first line's start, and just past its last line."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.rstrip().endswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.rstrip().endswith(END)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise SystemExit(f"{path}: needs exactly one line ending with {BEGIN!r} and one after it ending with {END!r}")
    return sum(map(len, lines[: begins[0]])), sum(map(len, lines[: ends[0] + 1]))


def kit_of(path: Path) -> str:
    text = path.read_text()
    start, stop = kit_bounds(text, path)
    return text[start:stop]


def other_recipes() -> list[Path]:
    return [p for p in sorted(RECIPES_DIR.glob("*.py")) if p != SOURCE and not p.name.startswith("_")]


def differences() -> dict[Path, str]:
    """{recipe: unified diff against gpt_pretrain.py's kit} for each recipe whose kit differs."""
    source = kit_of(SOURCE)
    found = {}
    for path in other_recipes():
        kit = kit_of(path)
        if kit != source:
            diff = difflib.unified_diff(source.splitlines(True), kit.splitlines(True), str(SOURCE), str(path))
            found[path] = "".join(diff)
    return found


def sync() -> list[Path]:
    """Copy gpt_pretrain.py's kit onto every other recipe; returns those that changed."""
    source, changed = kit_of(SOURCE), []
    for path in other_recipes():
        text = path.read_text()
        start, stop = kit_bounds(text, path)
        if text[start:stop] != source:
            path.write_text(text[:start] + source + text[stop:])
            changed.append(path)
    return changed


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        found = differences()
        for diff in found.values():
            print(diff)
        sys.exit(1 if found else 0)
    for path in sync():
        print(f"copied the run kit of {SOURCE.name} onto {path.name}")
