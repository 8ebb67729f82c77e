"""Ideas for a faster GPT training step on CPU, each timed against the recipe's own step in ONE process.

    python benchmarks/gpt_step_variants.py                                # every variant (about 4 minutes)
    python benchmarks/gpt_step_variants.py --nanogpt_dir ~/nanoGPT        # also nanoGPT's own model and optimizer
    python benchmarks/gpt_step_variants.py --variants recipe foreach --rounds 10

Every variant trains its own copy of nanoGPT's CPU shape (4 layers, 4 heads, width 128, block 64, vocabulary 65,
batch 12, dropout 0) on the same random batch, a step being forward, cross-entropy, backward, clipping to 1.0,
AdamW's step and zero_grad. After two untimed steps (whose time, the compile's where there is one, is printed),
the variants alternate in blocks of --steps steps for --rounds rounds; the table gives each one's median time per
step and its ratio to the recipe's. The recipe's model and optimizer come from recipes/gpt_pretrain.py itself
(build_model, optimizer_and_schedule).

recipe        the recipe as it is: transformers' GPT2LMHeadModel (sdpa attention, fused tanh GELU), AdamW
foreach       AdamW(foreach=True) (torch's default on CPU is the per-tensor loop)
fused         AdamW(fused=True)
compile       torch.compile(model) (inductor; forward and backward compiled, the optimizer not)
compile_opt   torch.compile of the model and of the clipping + optimizer step
bf16          bf16 autocast around the forward (the CPU's bf16 instructions, where it has them)
nanogpt       nanoGPT's model.py and configure_optimizers, imported from --nanogpt_dir (never copied here)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import load_recipe, warn_if_busy  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt_pretrain.py"
VARIANTS = ["recipe", "foreach", "fused", "compile", "compile_opt", "bf16", "nanogpt"]
VOCAB, BATCH, BLOCK = 65, 12, 64


class CharTokenizer:
    """What build_model reads of a tokenizer: Tiny Shakespeare's 65 characters, no special tokens."""

    bos_token_id = eos_token_id = None

    def __len__(self):
        return VOCAB


def make_step(variant: str, recipe, nanogpt_dir: Path | None, inputs, targets):
    """A function doing one training step of this variant."""
    torch.manual_seed(0)
    if variant == "nanogpt":
        sys.path.insert(0, str(nanogpt_dir))
        from model import GPT, GPTConfig  # nanoGPT's own, from the checkout

        model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

        def loss_of(x, y):
            return model(x, y)[1]
    else:
        args = recipe.parse_args(["--dropout", "0"])
        model, _ = recipe.build_model(args, CharTokenizer())
        model.config.use_cache = False
        adamw = torch.optim.AdamW
        if variant in ("foreach", "fused"):
            adamw = functools.partial(torch.optim.AdamW, **{variant: True})
        with mock.patch.object(torch.optim, "AdamW", adamw):
            optimizer, _ = recipe.optimizer_and_schedule(args, model)
        forward = torch.compile(model) if variant.startswith("compile") else model
        precision = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()

        def loss_of(x, y):
            with precision:
                logits = forward(input_ids=x).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    if variant == "compile_opt":
        update = torch.compile(update)

    def step():
        loss_of(inputs, targets).backward()
        update()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--nanogpt_dir", type=Path, help="a nanoGPT checkout, for the nanogpt variant")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    args = parser.parse_args()
    variants = [v for v in args.variants if v != "nanogpt" or args.nanogpt_dir]
    warn_if_busy()
    recipe = load_recipe(RECIPE)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=generator)

    steps = {}
    for variant in variants:
        steps[variant] = make_step(variant, recipe, args.nanogpt_dir, inputs, targets)
        start = time.perf_counter()
        steps[variant](), steps[variant]()
        print(f"{variant:12s} first two steps {time.perf_counter() - start:6.2f} s", flush=True)
    times = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else reversed(variants):
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[variant]()
            times[variant].append((time.perf_counter() - start) / args.steps * 1000)
    base = statistics.median(times[variants[0]])
    print(f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps; ratio to {variants[0]}:")
    for variant in variants:
        median = statistics.median(times[variant])
        print(
            f"{variant:12s} {median:7.2f} ms/step  ratio {median / base:.3f}  (fastest block {min(times[variant]):.2f})"
        )


if __name__ == "__main__":
    main()
