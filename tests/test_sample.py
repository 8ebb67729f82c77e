"""`accel-dp sample`: text from a trained gpt-pretrain run, through transformers, past the model's context."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from accel_dp.cli import app
from accel_dp.sample import generate_text, load_gpt_run

runner = CliRunner()


def sample(run_dir, *options: str):
    result = runner.invoke(app, ["sample", str(run_dir), *options])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_sample_continues_the_prompt_past_the_models_context_and_is_reproducible(tiny_gpt_run):
    # The tiny model has 32 positions; 60 new characters need the window to slide.
    first = sample(tiny_gpt_run, "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3")
    assert first.startswith("ROMEO:")
    assert len(first) == len("ROMEO:") + 60 + 1  # one character per token (char tokenizer), and the newline
    assert sample(tiny_gpt_run, "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3") == first
    assert sample(tiny_gpt_run, "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "4") != first


def test_temperature_zero_gives_transformers_greedy_continuation(tiny_gpt_run):
    model, tokenizer = load_gpt_run(tiny_gpt_run)
    prompt, continuation = generate_text(model, tokenizer, "First Citizen:", max_new_tokens=10, temperature=0)
    ids = tokenizer("First Citizen:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert prompt == "First Citizen:"
    assert continuation == tokenizer.decode(greedy[0, ids.shape[1] :])


def test_prompt_characters_outside_the_vocabulary_are_reported(tiny_gpt_run):
    result = runner.invoke(app, ["sample", str(tiny_gpt_run), "--prompt", "KING☃:", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "the model saw 'KING:'" in result.stderr
    assert result.stdout.startswith("KING:")


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda root: root / "missing", [], "does not exist"),
        (lambda root: root, [], "has no config.json"),
        (lambda root: root / "glue", [], "holds BertForSequenceClassification, not a text generator"),
        (lambda root: root / "glue", ["--temperature", "-1"], "--temperature must be 0"),
        (lambda root: root / "glue", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_a_folder_that_is_not_a_gpt_run_is_a_one_line_error(tmp_path, make, options, message):
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    result = runner.invoke(app, ["sample", str(make(tmp_path)), *options])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and message in text and "Traceback" not in result.output
