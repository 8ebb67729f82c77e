"""Every row of docs/errors.md: the bad input gives its one-line message, exit status 2, and writes nothing.

The table in docs/errors.md is the specification: each row names a case below and the message it must print, so
the documentation and the behaviour cannot drift apart. A case builds its input in tmp_path and returns the
command; the test runs it, then checks the message, the exit status, and that no file under tmp_path was
created, changed or removed. Each recipe row runs three ways: the recipe called directly, and through
`accel-dp run` on 1 and on 2 CPU processes (the path most users take: one line, not one per process, no launcher
traceback, the recipe's exit status).
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from conftest import DATA_DIR, REPO_ROOT, free_port, glue_args, gpt_args, load_recipe, reset_accelerate_state
from typer.testing import CliRunner

from accel_dp.cli import app

ERRORS_DOC = REPO_ROOT / "docs" / "errors.md"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def documented_rows() -> dict[str, str]:
    """{case id: message excerpt} from the table in docs/errors.md (first and last columns, in backticks)."""
    rows = {}
    for line in ERRORS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[-1].strip("`").strip()
    return rows


def mrpc_folder(tmp: Path, train_rows: str, header: str = MRPC_HEADER) -> Path:
    folder = tmp / "MRPC"
    folder.mkdir()
    (folder / "train.tsv").write_text(header + train_rows)
    (folder / "dev.tsv").write_text((DATA_DIR / "glue" / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig"))
    return folder


@functools.cache
def trained_run(token_cache: Path) -> Path:
    """A real gpt-pretrain run that saved a checkpoint after step 1 of 2, made once per test session (several rows,
    run three ways each, start from it)."""
    out = Path(tempfile.mkdtemp(prefix="gpt-trained-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    reset_accelerate_state()
    load_recipe("gpt_pretrain").main(gpt_args(out / "run", token_cache, "--max_train_steps", "2",
                                              "--checkpointing_steps", "1", "--sample_tokens", "0"))  # fmt: skip
    reset_accelerate_state()
    return out / "run"


def checkpoint_of(tmp: Path, token_cache: Path) -> Path:
    """A copy, under this test's tmp, of a real run whose checkpoint (after step 1) is returned."""
    shutil.copytree(trained_run(token_cache), tmp / "trained")
    return tmp / "trained" / "checkpoints" / "step-0000001"


def gpt(tmp: Path, token_cache: Path, *extra: str) -> tuple[str, list[str]]:
    return "gpt_pretrain", gpt_args(tmp / "out", token_cache, "--sample_tokens", "0", *extra)


def glue(tmp: Path, *extra: str) -> tuple[str, list[str]]:
    return "glue_bert", glue_args(tmp / "out", "--max_train_samples", "8", *extra)


def tsv_files(tmp: Path, train_rows: str) -> list[str]:
    """--train_file and --validation_file, TSV files with a header as GLUE writes them (no quoting)."""
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", "A man.\tA guy.\t1\n")):
        (tmp / name).write_text("sentence1\tsentence2\tlabel\n" + rows)
    return ["--train_file", str(tmp / "train.tsv"), "--validation_file", str(tmp / "dev.tsv")]


def cli(*argv: str) -> tuple[str, list[str]]:
    return "accel-dp", list(argv)


def corrupt(checkpoint: Path) -> Path:
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])  # a save cut short
    return checkpoint


def overwritten(checkpoint: Path) -> Path:
    """Up to 64 KiB of the weights overwritten in place: the file keeps its size, and its header still parses."""
    with open(checkpoint / "model.safetensors", "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        f.write(b"\xff" * min(2**16, size // 4))
    return checkpoint


def rewritten(checkpoint: Path, **changes) -> Path:
    """The checkpoint with its training_state.json changed: `layout` entries, or other keys (None removes one)."""
    state = json.loads((checkpoint / "training_state.json").read_text())
    state["layout"].update(changes.pop("layout", {}))
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    return checkpoint


# The trained run's global batch of 4, kept on 1 and on 2 processes.
ANY_PROCESSES = ("--per_device_train_batch_size", "2", "--global_batch_size", "4")


def damaged_cache(tmp: Path, token_cache: Path, how: str) -> Path:
    """A copy of the session's token cache, every entry damaged: its train.bin `cut` short, `overwritten` in place
    at its size, or its `meta` garbled."""
    trained_run(token_cache)  # (Tiny Shakespeare's entry is built)
    shutil.copytree(token_cache, tmp / "cache", ignore=shutil.ignore_patterns("*.lock"))
    for entry in [p for p in (tmp / "cache").iterdir() if (p / "meta.json").is_file()]:
        data = (entry / "train.bin").read_bytes()
        if how == "cut":
            (entry / "train.bin").write_bytes(data[: len(data) // 2])
        elif how == "overwritten":
            (entry / "train.bin").write_bytes(data[:1000] + bytes(1000) + data[2000:])
        else:
            (entry / "meta.json").write_text('{"dtype": "uint16", "train_tok')
    return tmp / "cache"


def held_by_another_run(folder: Path) -> Path:
    """A folder whose lock another run (on another machine) holds, its heartbeat fresh."""
    folder.mkdir()
    (folder / "run.lock").write_text("otherhost:4242\n2026-12-04 03:00:00")
    return folder


def reused_by_another_run(tmp: Path, token_cache: Path) -> Path:
    """A run's folder, checkpoints and all, whose run.json now names another run."""
    shutil.copytree(trained_run(token_cache), tmp / "reused")
    (tmp / "reused" / "run.json").write_text(json.dumps({"run": "20261201-000000-aaaaaaaa", "started": "then"}))
    return tmp / "reused"


def busy_port(tmp: Path) -> int:
    sock = socket.socket()
    sock.bind(("", 0))
    sock.listen()
    busy_port.held.append(sock)  # kept open until the test ends
    return sock.getsockname()[1]


busy_port.held = []

CASES = {
    # gpt-pretrain
    "gpt-unknown-flag": lambda t, c: gpt(t, c, "--num_train_epochs", "3"),
    "gpt-missing-data-file": lambda t, c: gpt(t, c, "--train_file", str(t / "nope.txt")),
    "gpt-train-file-is-a-folder": lambda t, c: (
        (t / "corpus").mkdir(), gpt(t, c, "--train_file", str(t / "corpus")))[1],
    "gpt-empty-data-file": lambda t, c: (
        (t / "empty.txt").write_text(""),
        gpt(t, c, "--train_file", str(t / "empty.txt")),
    )[1],
    "gpt-not-utf8": lambda t, c: (
        (t / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 200),
        gpt(t, c, "--train_file", str(t / "latin1.txt")),
    )[1],
    "gpt-dataset-missing-column": lambda t, c: (
        (t / "jsonl").mkdir(), (t / "jsonl" / "train.jsonl").write_text('{"content": "To be, or not to be"}\n' * 50),
        gpt(t, c, "--dataset_name", str(t / "jsonl")))[2],
    "gpt-dataset-column-not-text": lambda t, c: (  # (a cache of its own: a failed build leaves nothing there)
        (t / "jsonl").mkdir(), (t / "jsonl" / "train.jsonl").write_text('{"text": 12345}\n' * 50),
        gpt(t, c, "--dataset_name", str(t / "jsonl"), "--cache_dir", str(t / "cache")))[2],
    "gpt-vocab-size-below-tokenizer": lambda t, c: gpt(t, c, "--vocab_size", "10"),
    "gpt-block-size-beyond-positions": lambda t, c: ("gpt_pretrain", [  # a saved model with 32 positions
        "--model_name_or_path", str(checkpoint_of(t, c).parents[1]), "--block_size", "64",
        "--cache_dir", str(c), "--output_dir", str(t / "out")]),
    "kit-batch-size-zero": lambda t, c: gpt(t, c, "--per_device_train_batch_size", "0"),
    "kit-output-dir-is-file": lambda t, c: (
        (t / "file").write_text("x"), gpt(t, c, "--output_dir", str(t / "file")))[1],
    "kit-resume-missing": lambda t, c: gpt(t, c, "--resume_from_checkpoint", str(t / "nope")),
    "kit-resume-past-the-end": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(checkpoint_of(t, c)), "--max_train_steps", "1",
        "--per_device_train_batch_size", "2", "--global_batch_size", "4"),  # its global batch on 1 or 2 processes
    "kit-output-dir-not-writable": lambda t, c: gpt(t, c, "--output_dir", "/proc/accel-dp/run"),
    "kit-resume-not-a-checkpoint": lambda t, c: (
        (t / "d").mkdir(), gpt(t, c, "--resume_from_checkpoint", str(t / "d")))[1],
    "kit-corrupted-checkpoint": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(corrupt(checkpoint_of(t, c))), "--max_train_steps", "2"
    ),
    "kit-checkpoint-changed-contents": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(overwritten(checkpoint_of(t, c))), "--max_train_steps", "2"
    ),
    "kit-checkpoint-other-global-batch": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(rewritten(checkpoint_of(t, c), layout={"processes": 3})),
        "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
    ),
    "kit-checkpoint-local-sgd-other-processes": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(rewritten(checkpoint_of(t, c), layout={"processes": 4,
        "per_device_train_batch_size": 2}, per_process_optimizer=True)), "--max_train_steps", "2",
        "--global_batch_size", "8",
    ),
    "kit-checkpoint-older-format": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(rewritten(checkpoint_of(t, c), format=None)),
        "--max_train_steps", "2",
    ),
    "kit-output-dir-in-use": lambda t, c: (
        held_by_another_run(t / "out"), gpt(t, c, "--resume_from_checkpoint", "latest"))[1],
    "kit-latest-of-another-run": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", "latest", "--output_dir", str(reused_by_another_run(t, c)), *ANY_PROCESSES),
    "kit-checkpoint-other-recipe": lambda t, c: glue(t, "--resume_from_checkpoint", str(checkpoint_of(t, c))),
    "kit-checkpoint-other-model": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(checkpoint_of(t, c)), "--max_train_steps", "2", "--n_layer", "3",
        *ANY_PROCESSES),
    "kit-checkpoint-other-tokenizer": lambda t, c: gpt(
        t, c, "--resume_from_checkpoint", str(checkpoint_of(t, c)), "--max_train_steps", "2", "--tokenizer", "byte",
        *ANY_PROCESSES),
    "gpt-token-cache-cut-short": lambda t, c: gpt(t, c, "--cache_dir", str(damaged_cache(t, c, "cut"))),
    "gpt-token-cache-overwritten": lambda t, c: gpt(t, c, "--cache_dir", str(damaged_cache(t, c, "overwritten"))),
    "gpt-token-cache-meta-garbled": lambda t, c: gpt(t, c, "--cache_dir", str(damaged_cache(t, c, "meta"))),
    "gpt-learning-rate-not-a-number": lambda t, c: gpt(t, c, "--learning_rate", "nan"),
    "gpt-learning-rate-negative": lambda t, c: gpt(t, c, "--learning_rate", "-1"),
    "gpt-dropout-beyond-one": lambda t, c: gpt(t, c, "--dropout", "1.5"),
    "gpt-cache-dir-is-a-file": lambda t, c: (
        (t / "notes.txt").write_text("notes"), gpt(t, c, "--cache_dir", str(t / "notes.txt")))[1],
    "gpt-cache-dir-read-only": lambda t, c: gpt(t, c, "--cache_dir", "/proc/accel-dp/cache"),
    "gpt-memory-cannot-fit": lambda t, c: gpt(t, c, "--per_device_train_batch_size", "10000000"),
    "kit-checkpointing-steps-not-a-number": lambda t, c: gpt(t, c, "--checkpointing_steps", "often"),
    "kit-fp16-on-cpu": lambda t, c: gpt(t, c, "--mixed_precision", "fp16"),
    "kit-local-sgd-with-comm-hook": lambda t, c: gpt(t, c, "--local_sgd_steps", "4", "--ddp_comm_hook", "fp16"),
    "kit-powersgd-option-without-powersgd": lambda t, c: gpt(t, c, "--powersgd_rank", "2"),
    "kit-powersgd-start-below-2": lambda t, c: gpt(t, c, "--ddp_comm_hook", "powersgd", "--powersgd_start_iter", "1"),
    # glue-bert
    "glue-flag-value-of-another-type": lambda t, c: glue(t, "--learning_rate", "fast"),
    "glue-unknown-task": lambda t, c: glue(t, "--task", "squad"),
    "glue-missing-data-file": lambda t, c: glue(
        t, "--train_file", str(t / "a.csv"), "--validation_file", str(t / "b.csv")),
    "glue-empty-data-file": lambda t, c: glue(t, "--data_dir", str(mrpc_folder(t, "", header=""))),
    "glue-tsv-wrong-columns": lambda t, c: glue(
        t, "--data_dir", str(mrpc_folder(t, "1\ta\tb\n", header="label\tx\ty\n"))),
    "glue-tsv-row-fields": lambda t, c: glue(t, *tsv_files(t, "A man.\tA guy.\t1\nA dog.\tA\tcat.\t0\n")),
    "glue-empty-label": lambda t, c: glue(t, *tsv_files(t, '"Quoted," he said.\tA guy.\t1\nA dog.\tA cat.\t\n')),
    "glue-validation-header-only": lambda t, c: (
        glue(t, *tsv_files(t, "A man.\tA guy.\t1\n")), (t / "dev.tsv").write_text("sentence1\tsentence2\tlabel\n"))[0],
    "glue-label-out-of-range": lambda t, c: glue(t, "--data_dir", str(mrpc_folder(t, "7\t1\t2\tA man.\tA guy.\n"))),
    "glue-checkpointing-steps-not-a-number": lambda t, c: glue(t, "--checkpointing_steps", "often"),
    "glue-learning-rate-not-a-number": lambda t, c: glue(t, "--learning_rate", "nan"),
    "glue-metric-not-loadable": lambda t, c: glue(t, "--metric", "glue", "--trust_remote_code"),
    "glue-hub-metric-without-trust": lambda t, c: glue(t, "--metric", "glue"),
    # accel-dp run
    "cli-unknown-recipe": lambda t, c: cli("run", "bert-pretrain", "--cpu"),
    "cli-missing-config": lambda t, c: cli("run", "gpt-pretrain", "--config", str(t / "nope.yaml")),
    "cli-invalid-config": lambda t, c: (
        (t / "bad.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPUS\n"),
        cli("run", "gpt-pretrain", "--config", str(t / "bad.yaml")),
    )[1],
    "cli-config-not-utf8": lambda t, c: (
        (t / "latin1.yaml").write_bytes("distributed_type: NO\nnum_processes: 1\n# caf\xe9\n".encode("latin-1")),
        cli("run", "gpt-pretrain", "--config", str(t / "latin1.yaml")))[1],
    "cli-not-a-config": lambda t, c: (
        (t / "notes.yaml").write_text("- just\n- a list\n"),
        cli("run", "gpt-pretrain", "--config", str(t / "notes.yaml")),
    )[1],
    "cli-gpus-beyond-machine": lambda t, c: cli("run", "gpt-pretrain", "--gpus", "8"),
    "cli-port-in-use": lambda t, c: cli(
        "run", "gpt-pretrain", "--cpu", "--procs", "2", "--main-port", str(busy_port(t))),
    "cli-main-port-out-of-range": lambda t, c: cli("run", "gpt-pretrain", "--cpu", "--main-port", "99999"),
    "cli-copy-through-a-symlink": lambda t, c: (
        (t / "dest").mkdir(), (t / "elsewhere.py").write_text("mine"),
        (t / "dest" / "gpt_pretrain.py").symlink_to(t / "elsewhere.py"),
        cli("copy", "gpt-pretrain", str(t / "dest"), "--force"))[-1],
    "cli-copy-under-a-file": lambda t, c: (
        (t / "notes.txt").write_text("notes"), cli("copy", "gpt-pretrain", str(t / "notes.txt" / "project")))[1],
    "cli-copy-into-read-only": lambda t, c: cli("copy", "gpt-pretrain", "/proc/accel-dp/project"),
    "cli-max-restarts-one-process": lambda t, c: cli("run", "gpt-pretrain", "--cpu", "--max-restarts", "2"),
    "cli-nodes-range-upside-down": lambda t, c: cli(
        "run", "gpt-pretrain", "--cpu", "--nodes", "3:2", "--main-ip", "127.0.0.1"
    ),
    "cli-nodes-range-without-output-dir": lambda t, c: cli(
        "run", "gpt-pretrain", "--cpu", "--nodes", "1:2", "--main-ip", "127.0.0.1"
    ),
    "cli-fp16-on-cpu": lambda t, c: cli("run", "gpt-pretrain", "--cpu", "--mixed-precision", "fp16"),
}  # fmt: skip


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_every_documented_error_has_a_case_and_every_case_is_documented():
    assert set(documented_rows()) == set(CASES)


def check_one_line_exit_2_and_nothing_written(case: str, code, stderr: str, tmp_path: Path, before: dict) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and documented_rows()[case] in errors[0], stderr
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before  # nothing created, changed or removed


RECIPE_CASES = sorted(case for case in CASES if not case.startswith("cli-"))


# On 2 processes: with the fault step (`make test-faults`), which .ci/run runs after `make test`.
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.launch_matrix)])
@pytest.mark.parametrize("case", RECIPE_CASES)
def test_bad_input_through_accel_dp_run_gives_the_same_one_line_and_exit_2(case, processes, tmp_path, token_cache,
                                                                           capfd):  # fmt: skip
    program, argv = CASES[case](tmp_path, token_cache)
    before = snapshot(tmp_path)
    capfd.readouterr()
    recipe = program.replace("_", "-")
    launch = ["run", recipe, "--cpu", "--procs", str(processes), "--main-port", str(free_port())]
    result = CliRunner().invoke(app, [*launch, "--", *argv])
    stderr = result.stderr + capfd.readouterr().err  # accel-dp's own, then its processes' (file descriptor 2)
    check_one_line_exit_2_and_nothing_written(case, result.exit_code, stderr, tmp_path, before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, tmp_path, token_cache, capsys):
    program, argv = CASES[case](tmp_path, token_cache)
    before = snapshot(tmp_path)
    capsys.readouterr()
    if program == "accel-dp":
        result = CliRunner().invoke(app, argv)
        code, stderr = result.exit_code, result.stderr
    else:
        recipe = load_recipe(program)
        with pytest.raises(SystemExit) as exit_info:  # as `python recipes/<program>.py` runs it
            recipe.run_main(lambda: recipe.main(argv), recipe.RECIPE)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    for sock in busy_port.held:
        sock.close()
    busy_port.held.clear()
    check_one_line_exit_2_and_nothing_written(case, code, stderr, tmp_path, before)
