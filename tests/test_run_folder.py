"""What the recipes save is a standard Hugging Face model folder: `transformers.pipeline` uses it as it is."""

from __future__ import annotations

import pytest
import run_folder
import torch
from conftest import load_recipe, reset_accelerate_state
from transformers import pipeline

GLUE_TINY = [
    "--max_train_samples", "16", "--max_eval_samples", "8", "--max_length", "64", "--max_train_steps", "1",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_glue_run(tmp_path_factory):
    """MiniLM fine-tuned one step on 16 MRPC pairs: enough to have a saved classifier with MRPC's label names."""
    output_dir = tmp_path_factory.mktemp("tiny_glue") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_glue_bert.py: one thread is faster on a shared 2-core machine
    try:
        reset_accelerate_state()
        load_recipe("glue_bert").main([*GLUE_TINY, "--output_dir", str(output_dir)])
        reset_accelerate_state()
    finally:
        torch.set_num_threads(threads)
    return output_dir


def test_gpt_pretrain_output_generates_text_with_a_text_generation_pipeline(tiny_gpt_run):
    generator = pipeline("text-generation", model=str(tiny_gpt_run), device="cpu")
    [output] = generator("First Citizen:", max_new_tokens=8, do_sample=False)
    text = output["generated_text"]
    assert text.startswith("First Citizen:") and len(text) == len("First Citizen:") + 8  # 8 characters


def test_glue_bert_output_classifies_a_sentence_pair_with_the_tasks_label_names(tiny_glue_run):
    classifier = pipeline("text-classification", model=str(tiny_glue_run), device="cpu")
    first, second = "The company's shares rose 5 percent on Monday.", "Shares of the company gained 5% on Monday."
    [prediction] = classifier([{"text": first, "text_pair": second}])
    assert prediction["label"] in ("equivalent", "not_equivalent")
    assert 0.5 <= prediction["score"] <= 1.0

    # The pipeline encoded the two sentences as a pair: its answer is the model's own on that pair.
    encoded = classifier.tokenizer(first, second, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**encoded).logits[0]
    assert prediction["label"] == classifier.model.config.id2label[int(logits.argmax())]
    assert prediction["score"] == pytest.approx(torch.softmax(logits, dim=-1).max().item(), abs=1e-5)


def test_results_are_strict_json_with_null_where_a_value_is_missing():
    import json

    results = {"eval_loss": float("nan"), "mfu": None, "curve": [1.0, float("inf")], "steps": 3}
    text = json.dumps(run_folder.finite_or_null(results))
    assert json.loads(text) == {"eval_loss": None, "mfu": None, "curve": [1.0, None], "steps": 3}
    assert "NaN" not in text and "Infinity" not in text
