"""Pretrain a GPT-2 language model from scratch on a text corpus, data-parallel with Accelerate.

With no arguments it trains nanoGPT's CPU model (4 layers, 4 heads, width 128, block 64, batch 12, 2000 steps)
on the bundled Tiny Shakespeare at the character level, and reaches a validation loss of about 1.88.

    python recipes/gpt_pretrain.py                                     # one process
    accelerate launch recipes/gpt_pretrain.py --model_size shakespeare # whatever `accelerate config` says
    torchrun --nproc_per_node 8 recipes/gpt_pretrain.py --model_size gpt2 --tokenizer gpt2 \\
        --dataset_name Skylion007/openwebtext --per_device_train_batch_size 16 --gradient_accumulation_steps 4
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/gpt_pretrain.py  # 2 CPU procs

Each of K processes holds a full replica of the model and takes a disjoint shard of every global batch;
DDP all-reduces (averages) the gradients, so every replica applies the same update. The global batch is
per_device_train_batch_size * gradient_accumulation_steps * K sequences of block_size tokens.

The file reads top to bottom: arguments, data, model, the training step, evaluation, main() (prepare, loop, save).
Modules beside it hold the machinery: token_cache.py turns the corpus into token files (like nanoGPT's
prepare.py), and run_kit.py with the modules it names is the plumbing glue_bert.py shares (checkpoints, faults,
metering). Copy them together (`accel-dp copy gpt-pretrain DIR` does): they need torch, accelerate, transformers,
tokenizers, datasets (for --dataset_name), numpy, safetensors, psutil and tqdm, and nothing from accel_dp.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

try:  # the modules beside this file (Python puts a script's folder on the import path)
    from faults import fail, run_main
    from messages import logger
    from metering import FlopsPerToken, check_memory, training_memory
    from run_args import RecipeParser, add_run_arguments, check_positive, check_run_arguments
    from run_kit import Run
    from token_cache import add_data_arguments, check_data_arguments, describe_entry, prepare_token_cache
    from training import Step, load_pretrained, make_optimizer, optimizer_step
except ModuleNotFoundError as missing:
    if missing.__traceback__.tb_next is not None:  # a package that one of those modules imports
        raise
    sys.exit(
        f"error: {missing.name}.py is not beside {Path(__file__).name}: `accel-dp copy gpt-pretrain DIR` copies it"
    )

# save_state drops GPT-2's tied LM head (the token embeddings' twin) and says so at every checkpoint, though
# load_state ties it back: expected and harmless. That module's other warnings still show.
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in str(record.msg))

RECIPE = "gpt-pretrain"
# Model shapes. `nano` is nanoGPT's CPU configuration, `shakespeare` its shakespeare_char GPU one, `gpt2` GPT-2 124M.
MODEL_PRESETS = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = RecipeParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)  # the token cache's: files or a dataset, the tokenizer, the cache folder
    parser.add_argument("--prepare_only", action="store_true", help="Tokenize the corpus into the cache, then stop.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(MODEL_PRESETS), default="nano")
    model.add_argument("--n_layer", type=int)
    model.add_argument("--n_head", type=int)
    model.add_argument("--n_embd", type=int)
    model.add_argument("--block_size", type=int, help="Context length in tokens.")
    model.add_argument("--dropout", type=float)
    model.add_argument("--model_name_or_path", help="Continue training a saved causal LM instead of a fresh one.")
    model.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    model.add_argument(
        "--vocab_size", type=int, help="Embedding rows, at least the tokenizer's (e.g. 50304 for GPT-2's 50257)."
    )
    model.add_argument(
        "--loss_chunk_tokens", type=int, help="LM loss this many positions at a time (default: 4096 past 1 GiB logits)."
    )

    optimizer = parser.add_argument_group("optimizer")
    optimizer.add_argument("--learning_rate", type=float, default=1e-3)
    optimizer.add_argument("--min_learning_rate", type=float, help="End of the cosine decay; default learning_rate/10.")
    optimizer.add_argument("--num_warmup_steps", type=int, default=100)
    optimizer.add_argument("--weight_decay", type=float, default=0.1)
    optimizer.add_argument("--adam_beta1", type=float, default=0.9)
    optimizer.add_argument("--adam_beta2", type=float, default=0.99)

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=250, help="Optimizer steps between evaluations.")
    evaluation.add_argument(
        "--eval_iters", type=int, default=20, help="Validation set: this many global batches of windows."
    )
    evaluation.add_argument("--per_device_eval_batch_size", type=int, help="Default: the train batch size.")
    evaluation.add_argument("--sample_tokens", type=int, default=200, help="Tokens to generate at the end; 0: none.")
    evaluation.add_argument("--prompt", default="\n", help="Prompt of the generated sample.")
    add_run_arguments(parser)  # the run kit's: batches, precision, output, checkpoints, communication
    parser.set_defaults(per_device_train_batch_size=12, max_train_steps=2000, seed=1337)
    args = parser.parse_args(argv)

    check_run_arguments(args, RECIPE, has_epochs=False)
    check_positive(args, "per_device_eval_batch_size", "eval_every", "eval_iters")
    check_data_arguments(args)
    if args.model_name_or_path and any(
        getattr(args, k) is not None for k in ("n_layer", "n_head", "n_embd", "dropout")
    ):
        fail("--n_layer/--n_head/--n_embd/--dropout shape a new model: drop them with --model_name_or_path")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data: token_cache.py tokenizes the corpus once into token files (--prepare_only, or `accel-dp prepare gpt-pretrain`,
# builds them and stops); training serves windows of block_size + 1 tokens from a memory map, like nanoGPT's get_batch.
# ---------------------------------------------------------------------------------------------------------------------


class TokenWindows(torch.utils.data.Dataset):
    """Windows of block_size + 1 tokens; sample i starts at starts[i] (or at token i if starts is None).

    Inputs are the first block_size tokens and targets the same shifted by one, so every position is trained."""

    def __init__(self, tokens: np.ndarray, block_size: int, starts: np.ndarray | None = None):
        self.tokens, self.block_size, self.starts = tokens, block_size, starts

    def __len__(self):
        return len(self.starts) if self.starts is not None else len(self.tokens) - self.block_size

    def __getitem__(self, index):
        start = int(self.starts[index]) if self.starts is not None else index
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


def make_loaders(args, train_tokens, val_tokens, block_size: int, global_batch_size: int):
    """Training windows at random offsets, drawn with replacement (nanoGPT's sampling) from one seeded generator, so
    the sequence of global batches is the same whatever the number of processes: accelerate gives rank k the batches
    k, k+K, k+2K, ..., and K processes at batch B see exactly what one process sees at K*B. Validation: a fixed,
    evenly spaced set of eval_iters x global_batch_size windows, the same at any number of processes (and after an
    elastic resume, which keeps the global batch), shared out among them in per-device batches.

    Each loader has a generator of its own: a DataLoader without one draws from the global RNG (which dropout uses)
    each time it starts, and a resumed run starts its loader at another moment than the original."""
    train_windows = TokenWindows(train_tokens, block_size)
    data_generator = torch.Generator().manual_seed(args.seed)
    sampler = torch.utils.data.RandomSampler(
        train_windows, replacement=True, num_samples=args.max_train_steps * global_batch_size, generator=data_generator
    )
    train_loader = torch.utils.data.DataLoader(
        train_windows, batch_size=args.per_device_train_batch_size, sampler=sampler, generator=data_generator
    )
    eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    windows = args.eval_iters * global_batch_size
    starts = np.linspace(0, len(val_tokens) - block_size - 1, num=windows).astype(np.int64)
    val_loader = torch.utils.data.DataLoader(
        TokenWindows(val_tokens, block_size, starts), batch_size=eval_batch_size, generator=torch.Generator()
    )
    return train_loader, val_loader


# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------------------------------------------------


def build_model(args, tokenizer) -> tuple[torch.nn.Module, int]:
    """A fresh GPT-2 of the preset shape (flags override it), or a saved causal LM to go on training; and the context
    length it trains on."""
    if args.model_name_or_path:
        model = load_pretrained(
            AutoModelForCausalLM, args.model_name_or_path, attn_implementation=args.attn_implementation
        )
        max_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        block_size = args.block_size or max_positions
        if block_size > max_positions:
            fail(
                f"--block_size {block_size} exceeds the model's {max_positions} positions: use at most {max_positions}"
            )
        if len(tokenizer) > model.config.vocab_size:
            fail(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: pass the "
                "model's own tokenizer with --tokenizer"
            )
        return model, block_size
    shape = dict(MODEL_PRESETS[args.model_size])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    if shape["n_embd"] % shape["n_head"]:
        fail(f"--n_embd {shape['n_embd']} must be divisible by --n_head {shape['n_head']}")
    if shape["block_size"] < 1:
        fail(f"--block_size must be a positive integer, got {shape['block_size']}")
    vocab_size = args.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        fail(f"--vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens: give at least that")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape["block_size"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=shape["dropout"],
        embd_pdrop=shape["dropout"],
        attn_pdrop=shape["dropout"],
        # GPT-2's tanh GELU as one fused kernel: the same function as the default "gelu_new", which transformers
        # computes in five Python-level ops (about 10 % of a CPU step for the nano model, by profile_gpt.py).
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
    # Rows past the tokenizer's (padding to a multiple of 64 keeps GPU matmuls on whole tiles) are never generated:
    # saved in the generation config, which pipeline("text-generation") reads too. The loss never sees them.
    model.generation_config.suppress_tokens = list(range(len(tokenizer), vocab_size)) or None
    return model, shape["block_size"]


def optimizer_and_schedule(args, model, mixed_precision: str = "no"):
    """The run kit's AdamW (weight decay on matrices only) and nanoGPT's schedule: linear warmup, then a cosine decay
    to --min_learning_rate, counted in optimizer steps."""
    return make_optimizer(
        model,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        schedule="cosine_with_min_lr",
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
        min_lr=args.min_learning_rate if args.min_learning_rate is not None else args.learning_rate / 10,
        mixed_precision=mixed_precision,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Training step and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_step(
    accelerator, model, optimizer, micro_batches, max_grad_norm, flops_per_token, vocab: int, chunk_tokens=None
) -> Step:
    """One optimizer step over its micro-batches: forward, backward (accelerate's accumulate skips DDP's all-reduce
    on all but the last), then clipping and the step unless the gradient is NaN or inf. The loss is over the
    tokenizer's `vocab` tokens: embedding rows padded past them (--vocab_size) never enter it. benchmarks/overhead.py
    times this very function."""
    loss_sum, sequences, tokens, finite, grad_norm = 0.0, 0, 0, True, None
    for inputs, targets in micro_batches:
        with accelerator.accumulate(model):
            loss = causal_lm_loss(accelerator, model, inputs, targets, vocab, chunk_tokens)
            accelerator.backward(loss)  # divided by the accumulation steps
            finite, grad_norm = optimizer_step(accelerator, model, optimizer, max_grad_norm)
        loss_sum = loss_sum + loss.detach() * len(inputs)  # the mean over sequences is what a log step reports
        sequences, tokens = sequences + len(inputs), tokens + inputs.numel()
    return Step(loss_sum, sequences, tokens, tokens * flops_per_token, grad_norm, finite)


def causal_lm_loss(accelerator, model, inputs, targets, vocab: int, chunk_tokens: int | None) -> torch.Tensor:
    """The mean next-token cross-entropy over the tokenizer's `vocab` rows. With chunk_tokens, a micro-batch's fp32
    logits are never held whole (at 16 x 1024 tokens and GPT-2's 50304 rows they are 3.3 GB): the model stops at its
    last hidden state (transformers' logits_to_keep, through DDP's forward), and the LM head's logits are made a
    chunk of positions at a time, recomputed in the backward (activation checkpointing) instead of kept."""
    if not chunk_tokens:
        logits = model(input_ids=inputs).logits[..., :vocab]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    none = torch.zeros(0, dtype=torch.long, device=inputs.device)
    hidden = model(input_ids=inputs, logits_to_keep=none, output_hidden_states=True).hidden_states[-1].flatten(0, 1)
    weight, targets = accelerator.unwrap_model(model).lm_head.weight[:vocab], targets.flatten()
    with accelerator.autocast():  # the head in the run's precision, as inside the model's forward
        sums = [
            torch.utils.checkpoint.checkpoint(
                lambda h, t: F.cross_entropy((h @ weight.T).float(), t, reduction="sum"),
                hidden[start : start + chunk_tokens],
                targets[start : start + chunk_tokens],
                use_reentrant=False,
            )
            for start in range(0, len(targets), chunk_tokens)
        ]
    return torch.stack(sums).sum() / len(targets)


@torch.no_grad()
def evaluate(accelerator, model, val_loader, vocab: int) -> float:
    """Mean loss over the fixed validation windows, gathered from all processes (no duplicates)."""
    model.eval()
    losses = []
    for inputs, targets in val_loader:
        logits = model(input_ids=inputs).logits[..., :vocab]
        per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        losses.append(accelerator.gather_for_metrics(per_token.view_as(targets).mean(dim=1)))
    model.train()
    return torch.cat(losses).mean().item()


@torch.no_grad()
def generate_sample(accelerator, model, tokenizer, prompt: str, max_tokens: int, block_size: int) -> str:
    """A short sample from the trained model, so you can see what it learned. When FSDP or DeepSpeed shard the
    weights, every process must take part in each forward (synced_gpus keeps them in step); else rank 0 alone."""
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if max_tokens < 1 or not (sharded or accelerator.is_main_process):
        return ""
    model = accelerator.unwrap_model(model)
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
    room = block_size - encoded["input_ids"].shape[1]  # the model has no positions beyond block_size
    # One token at a time, each a new shape: a compiled forward (--torch_compile) would recompile at every step.
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        generated = model.generate(
            **encoded,
            max_new_tokens=max(1, min(max_tokens, room)),
            do_sample=True,
            top_k=200,
            temperature=0.8,
            pad_token_id=tokenizer.eos_token_id or 0,
            synced_gpus=sharded and accelerator.num_processes > 1,
        )
    return tokenizer.decode(generated[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------------
# main: set up, prepare, train, save
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = Run(RECIPE, args, unit="tokens")  # launch checks, the Accelerator, the output folder, the checkpoint
    accelerator, accumulation = run.accelerator, run.accumulation
    run.check_steps(args.max_train_steps)  # a checkpoint at or past the end: refused

    # ------------------------------------------------------------------------------------------------------- data
    cache_entry, meta = prepare_token_cache(args, builds=accelerator.is_local_main_process)
    if args.prepare_only:
        logger.info(f"{RECIPE}: {describe_entry(cache_entry, meta)}")
        return {"token_cache": str(cache_entry), **{k: v for k, v in meta.items() if k != "source"}}
    tokenizer = AutoTokenizer.from_pretrained(cache_entry / "tokenizer")
    train_tokens = np.memmap(cache_entry / "train.bin", dtype=meta["dtype"], mode="r")
    val_tokens = np.memmap(cache_entry / "val.bin", dtype=meta["dtype"], mode="r")
    # Bits per byte of validation text: comparable across tokenizers (a token is 1 byte or several).
    bits_per_byte = meta["val_tokens"] / meta["val_bytes"] / math.log(2)  # per nat of loss

    # ------------------------------------------------------------------------------------------------------ model
    set_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's at prepare)
    model, block_size = build_model(args, tokenizer)
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) <= block_size:
            fail(
                f"the {name} data has {len(tokens)} tokens, fewer than one block of {block_size} + 1: give more text "
                "or a smaller --block_size"
            )
    micro_batch_tokens, vocab = args.per_device_train_batch_size * block_size, model.config.vocab_size
    # The loss a chunk of positions at a time past 1 GiB of fp32 logits (not under FSDP or DeepSpeed: their LM head
    # is a shard outside the forward).
    big, sharded = micro_batch_tokens * vocab * 4 > 2**30, accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    chunk_tokens = None if sharded else args.loss_chunk_tokens or (4096 if big else None)
    # Attention is held whole (batch x heads x context^2) when eager, and on CPU with attention dropout: torch's CPU
    # flash kernel has no dropout, and sdpa falls back to its math kernel.
    cpu_dropout = accelerator.device.type == "cpu" and model.config.attn_pdrop > 0
    materialised = args.attn_implementation == "eager" or cpu_dropout
    logits = min(micro_batch_tokens, chunk_tokens or 2**62) * vocab
    check_memory(
        accelerator,
        training_memory(accelerator, model, micro_batch_tokens, block_size, materialised, logits),
        "--block_size, --per_device_train_batch_size (--gradient_accumulation_steps keeps the global batch) or the "
        "model size (--model_size, --n_layer, --n_embd)",
    )
    train_loader, val_loader = make_loaders(args, train_tokens, val_tokens, block_size, run.global_batch_size)
    optimizer, lr_scheduler = optimizer_and_schedule(args, model, accelerator.mixed_precision)
    flops_per_token = FlopsPerToken.of(model)(block_size)
    num_parameters = sum(p.numel() for p in model.parameters())

    # ---------------------------------------------------------------------------------------------------- prepare
    model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, lr_scheduler
    )
    run.begin(model, optimizer, lr_scheduler, fit={"tokenizer": args.tokenizer or "char"})  # a checkpoint restored
    # A resumed run's sampler replays the same seeded stream, and the batches already trained on are skipped.
    skipped = run.first_step * accumulation
    train_batches = iter(accelerator.skip_first_batches(train_loader, skipped) if skipped else train_loader)
    logger.info(
        f"{run.describe()}, {block_size} tokens per sequence; {num_parameters / 1e6:.2f}M parameters, vocabulary "
        f"{len(tokenizer)}, {args.max_train_steps} steps"
    )

    # ------------------------------------------------------------------------------------------------------- loop
    eval_loss = float("nan")
    with run.training(args.max_train_steps):
        model.train()
        for step in range(run.first_step + 1, args.max_train_steps + 1):
            micro_batches = itertools.islice(train_batches, accumulation)
            step_options = (args.max_grad_norm, flops_per_token, len(tokenizer), chunk_tokens)
            result = train_step(accelerator, model, optimizer, micro_batches, *step_options)
            run.step_done(step, result)  # guard (NaN or inf), meter, LR schedule, Local SGD, progress bar
            run.log_step(step, args.max_train_steps)  # every --log_every steps
            if step % args.eval_every == 0 or step == args.max_train_steps:
                with run.evaluation():
                    eval_loss = evaluate(accelerator, model, val_loader, len(tokenizer))
                record = {"step": step, "eval_loss": eval_loss, "eval_bits_per_byte": eval_loss * bits_per_byte}
                bits = f"{eval_loss * bits_per_byte:.4f} bits per byte"
                run.log(record, f"step {step}/{args.max_train_steps} | val loss {eval_loss:.4f} ({bits})")
            if step == args.max_train_steps:
                break  # the end of training saves the model itself (a signal now lets it finish)
            run.save(step)  # a checkpoint every --checkpointing_steps; after a signal, one, then exit 75

    # ------------------------------------------------------------------------------------------------------- save
    summary = run.meter.summary()
    sample = generate_sample(accelerator, model, tokenizer, args.prompt, args.sample_tokens, block_size)
    results = run.finish(
        model,
        tokenizer,
        {
            "world_size": accelerator.num_processes,
            "optimizer_steps": args.max_train_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": run.global_batch_size,
            "block_size": block_size,
            "train_tokens_seen": args.max_train_steps * run.global_batch_size * block_size,
            "num_parameters": num_parameters,
            "flops_per_token": flops_per_token,
            **summary,
            "train_loss": run.meter.last_loss,  # the last log step's: the mean over the steps since the one before
            "eval_loss": eval_loss,
            "eval_bits_per_byte": eval_loss * bits_per_byte,
            "mixed_precision": accelerator.mixed_precision,
            "ddp_comm_hook": args.ddp_comm_hook,
            "local_sgd_steps": args.local_sgd_steps,
        },
    )
    if accelerator.is_main_process:
        if sample:
            run.write_file("sample.txt", sample)
            print("---- sample ----\n" + sample + "\n----------------", flush=True)
        mfu = f" (MFU {results['mfu']:.1%})" if results["mfu"] is not None else ""
        logger.info(
            f"{RECIPE}: final val loss {eval_loss:.4f}, {results['tokens_per_second']:,.0f} tok/s, "
            f"{results['tflops']:.3g} TFLOP/s{mfu}, peak memory {results['peak_memory_gib']:.2f} GiB, "
            f"{results['train_runtime_s']:.1f}s training; saved to {run.output_dir}"
        )
    return results


if __name__ == "__main__":
    run_main(main, RECIPE)
