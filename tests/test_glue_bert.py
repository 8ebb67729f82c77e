"""recipes/glue_bert.py: world size, exact distributed evaluation, metrics, regression, bad input, LR schedule.

Small slices of the bundled MRPC and SST-2, the default all-MiniLM-L6 model, a few optimizer steps each.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    DATA_DIR,
    RECIPES_DIR,
    accel_dp_run,
    free_port,
    load_recipe,
    subprocess_env,
    tiny_bert,
)
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score

MRPC = DATA_DIR / "glue" / "MRPC"
SST2 = DATA_DIR / "glue" / "SST-2"
LR = 1e-4
SMALL = ["--max_train_samples", "64", "--max_eval_samples", "37", "--max_length", "64", "--learning_rate", str(LR)]
SMALL += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--log_every", "1"]


def read_predictions(path):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows


def dev_labels(folder, column, n):
    with open(folder / "dev.tsv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [int(r[column]) for r in rows[:n]]


def check_outputs(out, results, task, label_column, folder, world_size):
    """Every validation example evaluated once, in order, and the metrics recomputed from the saved file."""
    on_disk = json.loads((out / "all_results.json").read_text())
    assert on_disk == pytest.approx(results)
    assert results["world_size"] == world_size
    assert results["eval_samples"] == 37  # 37 = 2 x 8 x 2 + 5: does not divide by processes x batch size
    rows = read_predictions(out / "eval_predictions.tsv")
    assert [int(r["index"]) for r in rows] == list(range(37))
    labels = [int(r["label"]) for r in rows]
    assert labels == dev_labels(folder, label_column, 37)  # no duplicates, no drops, original order
    preds = [int(r["prediction"]) for r in rows]
    assert results["eval_accuracy"] == pytest.approx(accuracy_score(labels, preds))
    if task == "mrpc":
        assert results["eval_f1"] == pytest.approx(f1_score(labels, preds))


def expected_lr(steps, warmup):
    """transformers' linear schedule after `steps` scheduler steps."""
    return LR * steps / warmup


def test_one_process_mrpc(tmp_path):
    recipe = load_recipe("glue_bert")
    out = tmp_path / "run"
    results = recipe.main([*SMALL, "--max_train_steps", "3", "--num_warmup_steps", "10", "--output_dir", str(out)])
    check_outputs(out, results, "mrpc", "Quality", MRPC, world_size=1)
    assert results["optimizer_steps"] == 3
    assert results["final_learning_rate"] == pytest.approx(expected_lr(3, 10))
    # The saved model and tokenizer load back, with the task's label names.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}


def test_one_process_sst2_gradient_accumulation(tmp_path):
    # 64 examples / batch 8 = 8 micro-batches per epoch; accumulation 3 gives 3 optimizer steps per epoch (the
    # last window is closed by the end of the epoch). 4 steps = 2 epochs. The scheduler must step 4 times.
    recipe = load_recipe("glue_bert")
    out = tmp_path / "run"
    args = [*SMALL, "--task", "sst2", "--gradient_accumulation_steps", "3", "--max_train_steps", "4"]
    results = recipe.main([*args, "--num_warmup_steps", "10", "--output_dir", str(out)])
    check_outputs(out, results, "sst2", "label", SST2, world_size=1)
    assert results["optimizer_steps"] == 4 and results["epochs"] == 2
    assert results["final_learning_rate"] == pytest.approx(expected_lr(4, 10))


STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def write_stsb(folder, n_train=24, n_dev=13):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = "the a cat dog runs sleeps on mat red blue big small house tree".split()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(folder / name, "w") as f:
            f.write("\t".join(STSB_HEADER) + "\n")
            for i in range(n):
                a = " ".join(rng.choice(words, 6))
                b = " ".join(rng.choice(words, 6))
                score = round(float(rng.uniform(0, 5)), 3)
                f.write(f'{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a} "quoted\t{b}\t{score}\n')


def test_stsb_regression(tmp_path):
    data = tmp_path / "STS-B"
    write_stsb(data)
    recipe = load_recipe("glue_bert")
    out = tmp_path / "run"
    results = recipe.main(
        [
            "--task",
            "stsb",
            "--data_dir",
            str(data),
            "--max_train_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--max_length",
            "32",
            "--output_dir",
            str(out),
        ]
    )
    assert set(results) >= {"eval_pearson", "eval_spearmanr", "eval_loss"}
    assert results["eval_samples"] == 13
    rows = read_predictions(out / "eval_predictions.tsv")
    preds, labels = [float(r["prediction"]) for r in rows], [float(r["label"]) for r in rows]
    assert results["eval_pearson"] == pytest.approx(pearsonr(preds, labels)[0], abs=1e-4)
    assert results["eval_spearmanr"] == pytest.approx(spearmanr(preds, labels)[0], abs=1e-4)
    assert results["eval_loss"] == pytest.approx(np.mean((np.array(preds) - np.array(labels)) ** 2), rel=1e-3)


def expect_usage_error(capsys, argv, *fragments):
    recipe = load_recipe("glue_bert")
    with pytest.raises(SystemExit) as exc:
        recipe.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0]


@pytest.mark.parametrize(
    ("task", "train", "dev", "fragments"),
    [
        ("rte", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n", None, ("missing column", "sentence1")),
        ("sst2", "sentence\tlabel\ngood\t1\nbad\t2\n", "sentence\tlabel\nfine\t1\n", ("label '2'", "train.tsv")),
    ],
    ids=["wrong-columns", "label-out-of-range"],
)
def test_bad_glue_tsv_is_refused_and_writes_nothing(tmp_path, capsys, task, train, dev, fragments):
    data = tmp_path / task
    data.mkdir()
    (data / "train.tsv").write_text(train)
    (data / "dev.tsv").write_text(dev or train)
    out = tmp_path / "o"
    expect_usage_error(capsys, ["--task", task, "--data_dir", str(data), "--output_dir", str(out)], *fragments)
    assert not out.exists()


def test_stsb_score_out_of_range(tmp_path, capsys):
    data = tmp_path / "STS-B"
    write_stsb(data)
    with open(data / "dev.tsv", "a") as f:
        f.write("99\tg\tf\t2012\t0099\tnone\tnone\ta\tb\t7.5\n")
    expect_usage_error(
        capsys, ["--task", "stsb", "--data_dir", str(data), "--output_dir", str(tmp_path / "o")], "outside [0, 5]"
    )


def test_csv_labels_by_name(tmp_path):
    # CSV input, like run_glue_no_trainer: sentence1/sentence2 columns, labels spelled by name.
    rows = [("a man runs", "a person runs", "entailment"), ("a cat sleeps", "a dog barks", "not_entailment")] * 8
    for name in ("train.csv", "dev.csv"):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            w.writerows(rows)
    recipe = load_recipe("glue_bert")
    out = tmp_path / "run"
    args = [
        "--task",
        "rte",
        "--train_file",
        str(tmp_path / "train.csv"),
        "--validation_file",
        str(tmp_path / "dev.csv"),
    ]
    results = recipe.main([*args, "--max_train_steps", "1", "--max_length", "16", "--output_dir", str(out)])
    assert results["eval_samples"] == 16
    assert [int(r["label"]) for r in read_predictions(out / "eval_predictions.tsv")] == [0, 1] * 8


def test_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text("{}")
    expect_usage_error(capsys, ["--output_dir", str(out)], "already holds files", "--overwrite_output_dir")


def test_fp16_on_cpu_refused(tmp_path, capsys):
    expect_usage_error(capsys, ["--mixed_precision", "fp16", "--output_dir", str(tmp_path / "o")], "fp16")


def glue_metric(task: str):
    import evaluate

    return evaluate.load(str(RECIPES_DIR / "glue_metric.py"), task, keep_in_memory=True)


def test_the_evaluate_module_gives_scikit_learns_and_scipys_figures_for_every_task():
    """The figures glue-bert computed with scikit-learn and scipy before it used evaluate, from the same predictions,
    fed in batches as the recipe does (add_batch, then compute)."""
    from sklearn.metrics import matthews_corrcoef

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 203), rng.integers(0, 2, 203)
    scores, gold = rng.random(203).astype(np.float32) * 5, rng.random(203).astype(np.float32) * 5
    expected = {
        "mrpc": {"f1": f1_score(labels, predictions, pos_label=1, zero_division=0),
                 "accuracy": accuracy_score(labels, predictions)},
        "cola": {"matthews_correlation": matthews_corrcoef(labels, predictions)},
        "stsb": {"pearson": pearsonr(scores, gold)[0], "spearmanr": spearmanr(scores, gold)[0]},
    }  # fmt: skip
    for task, figures in expected.items():
        metric = glue_metric(task)
        fed = (scores, gold) if task == "stsb" else (predictions, labels)
        for start in range(0, 203, 64):
            metric.add_batch(predictions=fed[0][start : start + 64], references=fed[1][start : start + 64])
        computed = metric.compute()
        assert set(computed) == set(figures) and all(abs(computed[k] - v) <= 1e-9 for k, v in figures.items())
    for task in ("sst2", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli"):
        computed = glue_metric(task).compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
        assert computed["accuracy"] == 0.75 and set(computed) <= {"accuracy", "f1"}
    with pytest.raises(KeyError, match="no GLUE task"):
        glue_metric("squad")


def test_another_evaluate_metric_by_path_replaces_glues(tmp_path):
    """--metric PATH: any evaluate module, here a local one that counts the examples it saw."""
    (tmp_path / "counted.py").write_text(
        "import datasets\nimport evaluate\n\n\nclass Counted(evaluate.Metric):\n    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', features=datasets.Features("
        "{'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n        return {'examples': len(predictions)}\n"
    )
    results = load_recipe("glue_bert").main(
        ["--model_name_or_path", tiny_bert(), "--data_dir", str(MRPC), *SMALL, "--max_train_steps", "1",
         "--metric", str(tmp_path / "counted.py"), "--output_dir", str(tmp_path / "run")]
    )  # fmt: skip
    assert results["eval_examples"] == 37 and "eval_accuracy" not in results


def test_a_refused_run_never_imports_evaluate(tmp_path):
    """`import evaluate` costs seconds: a run refused by its checks (here the memory check, after the data and the
    model) has not paid for it."""
    code = (
        f"import sys; sys.path.insert(0, {str(RECIPES_DIR)!r}); import glue_bert\n"
        f"try: glue_bert.main(['--model_name_or_path', {tiny_bert()!r}, '--data_dir', {str(MRPC)!r}, "
        f"'--per_device_train_batch_size', '100000000', '--output_dir', {str(tmp_path / 'run')!r}])\n"
        "except SystemExit as refused: print('exit', refused.code, 'evaluate' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "GiB free" in done.stderr and done.stdout.split()[-3:] == ["exit", "2", "False"], done.stderr[-2000:]


@pytest.mark.slow
def test_two_runs_at_once_keep_evaluates_files_under_hf_home_and_none_in_the_current_folder(tmp_path):
    """A 2-process run through accel-dp run and a second run, at the same time on one machine, sharing HF_HOME."""
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"))
    args = ["--model_name_or_path", tiny_bert(), "--data_dir", str(MRPC), *SMALL, "--max_train_steps", "2"]
    folders = [tmp_path / "here_a", tmp_path / "here_b"]
    for folder in folders:
        folder.mkdir()
    commands = [
        [sys.executable, "-m", "accel_dp", "run", "glue-bert", "--cpu", "--procs", "2", "--main-port",
         str(free_port()), "--", *args, "--output_dir", str(tmp_path / "out_a")],
        [sys.executable, str(RECIPES_DIR / "glue_bert.py"), *args, "--output_dir", str(tmp_path / "out_b")],
    ]  # fmt: skip
    runs = [
        subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.PIPE, text=True)
        for command, folder in zip(commands, folders, strict=True)
    ]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [e[-2000:] for e in errors]
    assert all(list(folder.iterdir()) == [] for folder in folders)  # nothing in the current folder
    results = [json.loads((tmp_path / out / "all_results.json").read_text()) for out in ("out_a", "out_b")]
    assert [r["world_size"] for r in results] == [2, 1] and all(r["eval_samples"] == 37 for r in results)
    assert (tmp_path / "hf" / "modules").is_dir()  # evaluate's copy of the module, under HF_HOME


def test_mnli_matched_and_mismatched(tmp_path):
    # GLUE's MNLI layout: train has one annotator label, dev five; gold_label is the last column either way.
    data = tmp_path / "MNLI"
    data.mkdir()
    head = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2"
    )
    gold = ["entailment", "neutral", "contradiction"]
    (data / "train.tsv").write_text(
        head
        + "\tlabel1\tgold_label\n"
        + "".join(f"{i}\tp\tq\tg\tx\tx\tx\tx\tA man sits {i}.\tA person sits.\tl\t{gold[i % 3]}\n" for i in range(12))
    )
    for name, n in (("dev_matched.tsv", 7), ("dev_mismatched.tsv", 5)):
        rows = "".join(
            f'{i}\tp\tq\tg\tx\tx\tx\tx\tShe said "hi.\tShe spoke.\tl\tl\tl\tl\tl\t{gold[i % 3]}\n' for i in range(n)
        )
        (data / name).write_text(head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n" + rows)
    recipe = load_recipe("glue_bert")
    out = tmp_path / "run"
    results = recipe.main(
        [
            "--task",
            "mnli",
            "--data_dir",
            str(data),
            "--max_train_steps",
            "1",
            "--max_length",
            "32",
            "--output_dir",
            str(out),
        ]
    )
    assert results["eval_samples"] == 7 and results["eval_samples_mm"] == 5
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)
    mm = read_predictions(out / "eval_predictions_mm.tsv")
    assert [int(r["label"]) for r in mm] == [0, 1, 2, 0, 1]
    assert results["eval_accuracy_mm"] == pytest.approx(
        accuracy_score([int(r["label"]) for r in mm], [int(r["prediction"]) for r in mm])
    )


def test_cola_without_header(tmp_path):
    data = tmp_path / "CoLA"
    data.mkdir()
    for name, n in (("train.tsv", 10), ("dev.tsv", 6)):
        (data / name).write_text(
            "".join(f'gj04\t{i % 2}\t{"" if i % 2 else "*"}\tThe cat sat {i} "times.\n' for i in range(n))
        )
    recipe = load_recipe("glue_bert")
    results = recipe.main(
        [
            "--task",
            "cola",
            "--data_dir",
            str(data),
            "--max_train_steps",
            "1",
            "--max_length",
            "32",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert results["eval_samples"] == 6 and "eval_matthews_correlation" in results


def test_a_half_precision_checkpoint_trains_on_fp32_master_weights(tmp_path):
    """transformers loads a bf16 checkpoint in bf16 by default: fp16's loss scaler then cannot unscale it (found on
    an H200) and AdamW's updates round away. The recipe asks for fp32; --mixed_precision does the casting."""
    from transformers import AutoModel, AutoTokenizer

    half = tmp_path / "half"
    AutoModel.from_pretrained(tiny_bert()).to(torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_bert()).save_pretrained(half)
    recipe = load_recipe("glue_bert")
    recipe.main(
        [*SMALL, "--model_name_or_path", str(half), "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]
    )
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.float32}


@pytest.mark.slow
def test_a_glue_tsv_given_as_train_file_is_read_as_glue_writes_it(tmp_path):
    """MRPC's rows as a plain sentence1/sentence2/label TSV: about 1 row in 10 starts a sentence with a quote, which
    a CSV reader would pair with the next one. Every row comes back whole, in order: in the reader, and through
    accel-dp run on 2 processes, whose predictions file lists every validation row's label in order."""
    import glue_data

    with open(MRPC / "train.tsv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:300]
    assert sum(r["#1 String"].startswith('"') or r["#2 String"].startswith('"') for r in rows) > 10
    path = tmp_path / "train.tsv"
    path.write_text("sentence1\tsentence2\tlabel\n" + "".join(
        f"{r['#1 String']}\t{r['#2 String']}\t{r['Quality']}\n" for r in rows))  # fmt: skip
    table = glue_data.from_table("mrpc", glue_data.read_tsv_table(str(path)), str(path))
    assert table["sentence2"] == [r["#2 String"] for r in rows]
    assert table["label"] == [int(r["Quality"]) for r in rows]
    args = ["--model_name_or_path", tiny_bert(), "--train_file", str(path), "--validation_file", str(path),
            "--max_train_samples", "8", "--max_length", "32", "--max_train_steps", "1",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert accel_dp_run("glue-bert", 2, args) == 0
    with open(tmp_path / "out" / "eval_predictions.tsv") as f:
        assert [int(r["label"]) for r in csv.DictReader(f, delimiter="\t")] == table["label"]


def test_a_model_with_its_own_code_is_not_run_without_trust_remote_code(tmp_path, capsys):
    model_dir, marker = tmp_path / "custom_model", tmp_path / "code-ran"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "sneaky-bert",
        "auto_map": {"AutoConfig": "sneaky.SneakyConfig", "AutoModelForSequenceClassification": "sneaky.SneakyModel"},
    }))  # fmt: skip
    (model_dir / "sneaky.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("glue_bert").main(["--model_name_or_path", str(model_dir), "--data_dir",
                                       str(DATA_DIR / "glue" / "MRPC"), "--max_train_samples", "8",
                                       "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
