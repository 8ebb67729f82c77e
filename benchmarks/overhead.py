"""Accelerate's per-step overhead: each recipe's training step against a minimal raw PyTorch loop, in ONE process.

    python benchmarks/overhead.py                      # both recipes, full defaults (about 3 minutes on 2 cores)
    python benchmarks/overhead.py --recipe gpt         # GPT only (about 1 minute)
    python benchmarks/overhead.py --recipe glue        # GLUE only (about 2 minutes)
    python benchmarks/overhead.py --quick              # ~25 s: checks that it runs, measures nothing
    python benchmarks/overhead.py --threads 1 --rounds 20 --steps 30 --glue_steps 4

Both sides train their own copy of the same model (identical initial weights) on the same batches, in the same
process, with the same number of threads (torch.set_num_threads). They alternate in blocks: after an untimed
warm-up on each side, every round times one block of --steps optimizer steps on each side, the order flipping
each round (recipe first, then raw first, ...), and a block's wall time / steps is that round's per-step time.
The sides are seeded alike before each block, so dropout draws the same masks on both: at the end the two
models must hold the same parameters (printed as max |diff|), which shows that both did the same work.

Both sides use the recipe's own model shape, make_optimizer (AdamW with its weight-decay groups and its LR schedule)
and batches. The recipe side is the recipe's code itself, not a copy: an Accelerator made as the recipe makes it,
accelerator.prepare(model, optimizer, loader, scheduler), and per step what main()'s loop does around the recipe's
train_step (forward, loss, accelerator.backward under accumulate, clipping, the non-finite decision, the optimizer
step): the meter's on-device tally, one scheduler step, and every 10th step the meter's log record (one
accelerator.reduce) and the preemption check (accelerator.check_trigger). The raw side is a minimal PyTorch loop:
model(...), mean cross-entropy, loss.backward(), torch.nn.utils.clip_grad_norm_, step, zero_grad, scheduler.step(),
its batches taken from a list pre-built from the same loader (so its data costs nothing).

gpt  nanoGPT's CPU shape: transformers GPT2LMHeadModel, 4 layers, 4 heads, width 128, block 64, vocabulary 65 (Tiny
     Shakespeare's characters), batch 12, dropout 0, random tokens drawn once, served by the recipe's TokenWindows.
glue BertForSequenceClassification from the default model (all-MiniLM-L6, pooler re-initialised as the recipe does),
     batch 32 of bundled MRPC pairs padded to a fixed --glue_max_length (64) on both sides, so both do equal work.

Not timed on either side: tqdm, writing metrics.jsonl, evaluation, checkpoints. Target: recipe/raw per-step
time ratio <= 1.03 (ratio of the two sides' medians). The paired ratios (one per round) give the spread.
The recipes are imported from their files (importlib), so their own dataset classes and presets are used.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import load_recipe, recipe_module, warn_if_busy

glue_data, metering = recipe_module("glue_data"), recipe_module("metering")  # the modules beside the recipes

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.03
SHAKESPEARE_VOCAB = 65


def new_accelerator(**kwargs):
    """A fresh Accelerator; the state of one made earlier in this process (--recipe both) is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# GPT: recipes/gpt_pretrain.py
# ----------------------------------------------------------------------------------------------------------------


class RecipeSide:
    """The recipe's loop body around its own train_step: the guard's non-finite check, the meter, one scheduler
    step, and at every 10th step (--log_every) the meter's log record (one all-reduce) and the preemption check."""

    name = "recipe"

    def __init__(self, recipe, accelerator, model, optimizer, loader, scheduler, unit: str, step):
        self.recipe, self.accelerator = recipe, accelerator
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self.meter = metering.Meter(accelerator, unit, time.perf_counter())
        self.batches, self.step, self.train_step = iter(self.loader), 0, step
        self.model.train()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            result = self.train_step(self)
            if not result.finite:
                raise RuntimeError(f"recipe side: gradient norm {float(result.grad_norm)} at step {self.step + 1}")
            self.meter.add(result)
            self.scheduler.step()
            self.step += 1
            if self.step % 10 == 0:
                self.meter.record(self.step)  # stops the run on a non-finite loss, as in the recipe
                self.accelerator.check_trigger()


class GptRawSide:
    """A minimal PyTorch loop: no accelerate at all."""

    name = "raw"

    def __init__(self, model, optimizer, batches, scheduler, max_grad_norm, log_every):
        self.model, self.optimizer, self.batches, self.scheduler = model, optimizer, iter(batches), scheduler
        self.max_grad_norm, self.log_every = max_grad_norm, log_every
        self.step = 0
        self.model.train()

    def run(self, steps: int) -> None:
        model, optimizer = self.model, self.optimizer
        for _ in range(steps):
            inputs, targets = next(self.batches)
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            if self.step % self.log_every == 0:
                train_loss = loss.item()
                if not math.isfinite(train_loss):
                    raise RuntimeError(f"raw side: loss {train_loss} at step {self.step}")


def build_gpt(args, total_steps: int):
    from transformers import AutoModelForCausalLM, GPT2Config

    recipe = load_recipe("gpt_pretrain")
    defaults = recipe.parse_args([])  # the recipe's own defaults: lr, betas, weight decay, clipping, warm-up, seed
    shape = dict(recipe.MODEL_PRESETS["nano"])
    block_size, batch_size = shape["block_size"], defaults.per_device_train_batch_size
    seed = defaults.seed

    # Random tokens over Tiny Shakespeare's 65 characters, drawn once; the recipe's own dataset serves windows.
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SHAKESPEARE_VOCAB, size=200_000, dtype=np.uint16)
    windows = recipe.TokenWindows(tokens, block_size)

    def make_loader():  # as the recipe builds its training loader
        generator = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(
            windows, replacement=True, num_samples=total_steps * batch_size, generator=generator
        )
        return torch.utils.data.DataLoader(windows, batch_size=batch_size, sampler=sampler, generator=generator)

    config = GPT2Config(
        vocab_size=SHAKESPEARE_VOCAB,
        n_positions=block_size,
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=shape["dropout"],
        embd_pdrop=shape["dropout"],
        attn_pdrop=shape["dropout"],
        bos_token_id=None,  # the recipe's character tokenizer has neither
        activation_function="gelu_pytorch_tanh",  # as the recipe
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=defaults.attn_implementation)

    defaults.max_train_steps, defaults.num_warmup_steps = total_steps, min(defaults.num_warmup_steps, total_steps // 2)
    raw_model = copy.deepcopy(model)
    raw_optimizer, raw_scheduler = recipe.optimizer_and_schedule(defaults, raw_model)
    raw = GptRawSide(raw_model, raw_optimizer, list(make_loader()), raw_scheduler, defaults.max_grad_norm, 10)

    accelerator = new_accelerator(
        cpu=defaults.cpu,
        mixed_precision=defaults.mixed_precision,
        gradient_accumulation_steps=1,
        step_scheduler_with_optimizer=False,
    )
    optimizer, scheduler = recipe.optimizer_and_schedule(defaults, model)
    flops_per_token = metering.FlopsPerToken.of(model)(block_size)

    def step(side):
        batch = itertools.islice(side.batches, 1)
        return recipe.train_step(
            accelerator, side.model, side.optimizer, batch, defaults.max_grad_norm, flops_per_token, SHAKESPEARE_VOCAB
        )

    side = RecipeSide(recipe, accelerator, model, optimizer, make_loader(), scheduler, "tokens", step)
    params = sum(p.numel() for p in model.parameters())
    desc = (
        f"GPT2LMHeadModel {shape['n_layer']} layers, {shape['n_head']} heads, width {shape['n_embd']}, block "
        f"{block_size}, vocab {SHAKESPEARE_VOCAB} ({params / 1e6:.2f}M parameters), batch {batch_size}, "
        f"dropout {shape['dropout']}"
    )
    return side, raw, desc


# ----------------------------------------------------------------------------------------------------------------
# GLUE: recipes/glue_bert.py
# ----------------------------------------------------------------------------------------------------------------


class GlueRawSide:
    name = "raw"

    def __init__(self, model, optimizer, batches, scheduler, max_grad_norm):
        self.model, self.optimizer, self.batches, self.scheduler = model, optimizer, iter(batches), scheduler
        self.max_grad_norm = max_grad_norm
        self.model.train()

    def run(self, steps: int) -> None:
        model, optimizer = self.model, self.optimizer
        for _ in range(steps):
            batch = dict(next(self.batches))
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            self.scheduler.step()


def build_glue(args, total_steps: int):
    import datasets
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        default_data_collator,
    )

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()  # the "classifier newly initialised" report
    recipe = load_recipe("glue_bert")
    defaults = recipe.parse_args([])
    model_path = recipe.default_model_path()
    train = glue_data.read_glue_tsv("mrpc", REPO_ROOT / "data" / "glue" / "MRPC" / "train.tsv")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_length = args.glue_max_length

    def tokenize(batch):
        enc = tokenizer(
            batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length, padding="max_length"
        )
        enc["labels"] = batch["label"]
        return enc

    tokenized = train.map(tokenize, batched=True, remove_columns=train.column_names)
    batch_size = defaults.per_device_train_batch_size
    if total_steps > len(tokenized) // batch_size:
        raise SystemExit(f"error: {total_steps} GLUE steps need more than one MRPC epoch; lower --glue_steps/rounds")

    def make_loader():  # the recipe's training loader with --pad_to_max_length
        return torch.utils.data.DataLoader(
            tokenized,
            shuffle=True,
            collate_fn=default_data_collator,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(defaults.seed),
        )

    config = AutoConfig.from_pretrained(model_path, num_labels=2, finetuning_task="mrpc")
    torch.manual_seed(defaults.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config)
    for module in model.base_model.pooler.modules():  # the recipe's --reinit_pooler auto for the default model
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, config.initializer_range)
            module.bias.data.zero_()

    raw_model = copy.deepcopy(model)
    raw_optimizer, raw_scheduler, _ = recipe.optimizer_and_schedule(defaults, raw_model, total_steps)
    raw = GlueRawSide(raw_model, raw_optimizer, list(make_loader()), raw_scheduler, defaults.max_grad_norm)

    accelerator = new_accelerator(
        cpu=defaults.cpu,
        mixed_precision=defaults.mixed_precision,
        gradient_accumulation_steps=1,
        step_scheduler_with_optimizer=False,
    )
    optimizer, scheduler, _ = recipe.optimizer_and_schedule(defaults, model, total_steps)
    layout = recipe.EpochLayout(len(tokenized), batch_size, 1, 1)
    flops_per_token = metering.FlopsPerToken.of(model)

    def step(side):  # one micro-batch per step, counted from the epoch's start as the recipe's loop does
        batch = itertools.islice(side.batches, 1)
        return recipe.train_step(
            accelerator, side.model, side.optimizer, batch, side.step, layout, defaults.max_grad_norm, flops_per_token
        )

    side = RecipeSide(recipe, accelerator, model, optimizer, make_loader(), scheduler, "samples", step)
    params = sum(p.numel() for p in model.parameters())
    desc = (
        f"BertForSequenceClassification (all-MiniLM-L6-v2, {params / 1e6:.1f}M parameters), batch {batch_size} x "
        f"{max_length} tokens (MRPC pairs, fixed padding), dropout {config.hidden_dropout_prob}"
    )
    return side, raw, desc


# ----------------------------------------------------------------------------------------------------------------
# Alternating measurement
# ----------------------------------------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def measure(label: str, build, args, warmup: int, rounds: int, steps: int) -> bool:
    total = warmup + rounds * steps
    side, raw, desc = build(args, total)
    print(f"\n[{label}] {desc}; {torch.get_num_threads()} thread(s)", flush=True)
    print(f"[{label}] warm-up {warmup} steps per side, then {rounds} rounds x {steps} steps per side, alternating")
    seed = 1000
    for s in (side, raw):
        torch.manual_seed(seed)
        s.run(warmup)
    times = {"recipe": [], "raw": []}
    for r in range(rounds):
        order = (side, raw) if r % 2 == 0 else (raw, side)
        for s in order:
            gc.collect()
            torch.manual_seed(seed + 1 + r)  # the same dropout masks on both sides
            start = time.perf_counter()
            s.run(steps)
            times[s.name].append((time.perf_counter() - start) / steps)
        print(
            f"[{label}] round {r + 1:>2}/{rounds}: recipe {times['recipe'][-1] * 1e3:8.2f} ms/step | "
            f"raw {times['raw'][-1] * 1e3:8.2f} ms/step | ratio {times['recipe'][-1] / times['raw'][-1]:.3f}",
            flush=True,
        )
    diff = max(
        (a.detach() - b.detach()).abs().max().item()
        for a, b in zip(side.model.parameters(), raw.model.parameters(), strict=True)
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [a / b for a, b in zip(times["recipe"], times["raw"], strict=True)]
    ratio = med["recipe"] / med["raw"]
    for k in ("recipe", "raw"):
        q1, q3 = quartiles(times[k])
        print(
            f"[{label}] {k:>6}: median {med[k] * 1e3:.2f} ms/step (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f}, "
            f"min {min(times[k]) * 1e3:.2f}, max {max(times[k]) * 1e3:.2f})"
        )
    q1, q3 = quartiles(paired)
    print(
        f"[{label}] paired ratios (recipe/raw per round): median {statistics.median(paired):.3f}, "
        f"quartiles {q1:.3f}-{q3:.3f}, min {min(paired):.3f}, max {max(paired):.3f}"
    )
    print(f"[{label}] same work on both sides: max |parameter difference| after {total} steps = {diff:.3g}")
    met = ratio <= TARGET_RATIO
    print(
        f"[{label}] SUMMARY: recipe/raw per-step time ratio {ratio:.3f} "
        f"({med['recipe'] * 1e3:.2f} / {med['raw'] * 1e3:.2f} ms, median of {rounds}); "
        f"target <= {TARGET_RATIO}: {'met' if met else 'NOT met'}"
        + (" (--quick: not a measurement)" if args.quick else ""),
        flush=True,
    )
    return met


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=["gpt", "glue", "both"], default="both")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    p.add_argument("--warmup", type=int, default=20, help="GPT: untimed steps per side first")
    p.add_argument("--rounds", type=int, default=15, help="GPT: timed blocks per side")
    p.add_argument("--steps", type=int, default=40, help="GPT: optimizer steps per block")
    p.add_argument("--glue_warmup", type=int, default=3)
    p.add_argument("--glue_rounds", type=int, default=10)
    p.add_argument("--glue_steps", type=int, default=4)
    p.add_argument("--glue_max_length", type=int, default=64, help="fixed padding length of the GLUE batches")
    p.add_argument("--quick", action="store_true", help="a few steps only: checks that it runs")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.steps = 1, 2, 2
        args.glue_warmup, args.glue_rounds, args.glue_steps = 0, 2, 1
    torch.set_num_threads(args.threads)
    warn_if_busy()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s)")

    results = {}
    if args.recipe in ("gpt", "both"):
        results["gpt"] = measure("gpt", build_gpt, args, args.warmup, args.rounds, args.steps)
    if args.recipe in ("glue", "both"):
        results["glue"] = measure("glue", build_glue, args, args.glue_warmup, args.glue_rounds, args.glue_steps)
    print(
        "\noverall: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results.items())
        + f" (target recipe/raw <= {TARGET_RATIO})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
