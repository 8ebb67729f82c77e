"""The layout: recipes read in one sitting, the run kit once beside them, taking its recipe's name as an argument."""

from __future__ import annotations

import ast

import pytest
import run_kit
from conftest import RECIPES_DIR, load_recipe

from accel_dp import runner

# A recipe reads top to bottom in one sitting: its machinery lives in the modules beside it.
RECIPE_LINES = {"gpt_pretrain.py": 450, "glue_bert.py": 600}


def functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_recipes_stay_within_their_line_limits():
    for name, limit in RECIPE_LINES.items():
        lines = len((RECIPES_DIR / name).read_text().splitlines())
        assert lines <= limit, f"{name} is {lines} lines (at most {limit}): move machinery into a module beside it"
        assert dict(functions(RECIPES_DIR / name))["main"] <= 120, f"{name}: main() is over 120 lines"


def test_no_function_in_recipes_is_longer_than_150_lines():
    for path in RECIPES_DIR.glob("*.py"):
        for name, length in functions(path):
            assert length <= 150, f"{path.name}: {name}() is {length} lines"


def test_accel_dp_passes_on_the_kits_exit_codes():
    assert runner.PREEMPTED_EXIT_CODE == run_kit.PREEMPTED_EXIT_CODE == 75
    assert runner.ERROR_DIR_VARIABLE == run_kit.ERROR_DIR_VARIABLE


def test_the_kit_is_one_module_that_both_recipes_import():
    gpt, glue = load_recipe("gpt_pretrain"), load_recipe("glue_bert")
    assert gpt.Run is glue.Run is run_kit.Run and gpt.optimizer_step is glue.optimizer_step
    for path in RECIPES_DIR.glob("*.py"):
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        if path.name != "run_kit.py":
            kit = {n.name for n in ast.parse((RECIPES_DIR / "run_kit.py").read_text()).body if hasattr(n, "name")}
            assert not defined & kit, f"{path.name} defines again what the kit has: {defined & kit}"


def test_the_kit_names_the_recipe_it_was_given_with_both_loaded_in_one_process(tmp_path, capsys):
    """No module global holds a recipe's name: glue-bert loaded after gpt-pretrain changes nothing for either."""
    gpt, glue = load_recipe("gpt_pretrain"), load_recipe("glue_bert")
    assert not hasattr(run_kit, "RECIPE")
    with pytest.raises(SystemExit):
        gpt.parse_args(["--checkpointing_steps", "epoch"])
    assert "--checkpointing_steps epoch: gpt-pretrain has no epochs" in capsys.readouterr().err
    args = glue.parse_args(["--resume_from_checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit):
        glue.Run(glue.RECIPE, args, unit="samples")
    assert f"{tmp_path} is not a glue-bert checkpoint" in capsys.readouterr().err


def test_adamw_is_torchs_fused_one_except_under_fp16s_loss_scaler():
    """fp16's scaler must see every step to skip and count an overflowing one: there AdamW is foreach."""
    import torch

    model = torch.nn.Linear(4, 4)
    for precision, fused in (("no", True), ("bf16", True), ("fp16", False)):
        optimizer, _ = run_kit.make_optimizer(
            model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99), schedule="constant_with_warmup",
            num_warmup_steps=0, num_training_steps=10, mixed_precision=precision,
        )  # fmt: skip
        assert bool(optimizer.defaults["fused"]) is fused and bool(optimizer.defaults["foreach"]) is not fused


def test_results_are_strict_json_with_null_where_a_value_is_missing():
    import json

    results = {"eval_loss": float("nan"), "mfu": None, "curve": [1.0, float("inf")], "steps": 3}
    text = json.dumps(run_kit.finite_or_null(results))
    assert json.loads(text) == {"eval_loss": None, "mfu": None, "curve": [1.0, None], "steps": 3}
    assert "NaN" not in text and "Infinity" not in text
