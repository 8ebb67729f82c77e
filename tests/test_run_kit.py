"""recipes/run_kit.py, the Run facade: it names the recipe it was given, and refuses a run with nothing to train."""

from __future__ import annotations

import pytest
import run_kit
from conftest import load_recipe


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
