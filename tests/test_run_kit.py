"""The run kit section is the same in every recipe, and the launcher agrees with the kit's exit codes."""

from __future__ import annotations

import ast

import run_kit
from conftest import RECIPES_DIR, load_recipe

from accel_dp import runner


def test_every_recipe_carries_gpt_pretrains_run_kit_byte_for_byte():
    assert run_kit.other_recipes(), "no recipe besides gpt_pretrain.py"
    differences = run_kit.differences()
    assert not differences, "run `make kit` (edit the kit in recipes/gpt_pretrain.py):\n" + "\n".join(
        differences.values()
    )


def test_sync_copies_the_kit_and_the_check_sees_a_change(tmp_path, monkeypatch):
    """The `make kit` tool on a copy of the recipes: an edited kit is found, and syncing makes it equal again."""
    for path in RECIPES_DIR.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(run_kit, "RECIPES_DIR", tmp_path)
    monkeypatch.setattr(run_kit, "SOURCE", tmp_path / "gpt_pretrain.py")
    glue = tmp_path / "glue_bert.py"
    glue.write_text(glue.read_text().replace("PREEMPTED_EXIT_CODE = 75", "PREEMPTED_EXIT_CODE = 76", 1))
    assert set(run_kit.differences()) == {glue}
    assert run_kit.sync() == [glue]
    assert run_kit.differences() == {}
    assert glue.read_text() == (RECIPES_DIR / "glue_bert.py").read_text()


def test_the_kit_uses_nothing_of_its_recipe_but_the_recipe_name():
    """Every module-level name the kit uses is its own, an import or RECIPE: it can be pasted into any recipe."""
    path = RECIPES_DIR / "gpt_pretrain.py"
    text = path.read_text()
    start, stop = run_kit.kit_bounds(text, path)
    first_kit_line, last_kit_line = text[:start].count("\n") + 1, text[:stop].count("\n")
    defined_by_recipe = set()
    for node in ast.parse(text).body:
        if first_kit_line <= node.lineno <= last_kit_line:
            continue
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined_by_recipe.add(node.name)
        elif isinstance(node, ast.Assign):
            defined_by_recipe |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    used_by_kit = {n.id for n in ast.walk(ast.parse(text[start:stop])) if isinstance(n, ast.Name)}
    assert used_by_kit & defined_by_recipe == {"RECIPE"}


def test_accel_dp_passes_on_the_kits_exit_codes():
    for name in ("gpt_pretrain", "glue_bert"):
        recipe = load_recipe(name)
        assert runner.PREEMPTED_EXIT_CODE == recipe.PREEMPTED_EXIT_CODE == 75
        assert runner.ERROR_DIR_VARIABLE == recipe.ERROR_DIR_VARIABLE


def test_no_recipe_function_is_longer_than_150_lines():
    """main() reads top to bottom in one screenful per stage: no function (main included) over 150 lines."""
    for recipe in RECIPES_DIR.glob("*.py"):
        tree = ast.parse(recipe.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 150, f"{recipe.name}: {node.name}() is {length} lines"
