"""What the GPT recipe's data parallelism all-reduces, and what it costs: run under 2 (or more) processes.

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no benchmarks/dp_comm_probe.py [--per_device_batch 6] [--quick]
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/dp_comm_probe.py

benchmarks/dp_efficiency.py runs it for you (after its throughput runs). It builds what recipes/gpt_pretrain.py
builds with its defaults (the recipe module is imported from its file: its argument defaults, model presets,
token cache of the bundled Tiny Shakespeare and TokenWindows dataset), prepares it with accelerate (the model
becomes DistributedDataParallel over gloo) and registers a DDP communication hook that does what DDP's default
hook does (divide by the world size, all-reduce the bucket asynchronously) while it

  - counts the bytes of every bucket it all-reduces (bucket.buffer().numel() * element_size()), and
  - times each bucket's all-reduce from its launch to the completion of its future.

It then alternates blocks of the recipe's step (`with accelerator.accumulate(model)`, backward, clip, step)
with blocks of the same step under `model.no_sync()` (no all-reduce at all): the difference of their medians is
the time that communication and waiting for the other process add to a step. Last, it times a bare
all-reduce of a flat tensor of the gradients' size (no computation beside it).

Rank 0 prints one line `PROBE_RESULT {json}` (and writes the JSON to --json if given).
"""

from __future__ import annotations

import argparse
import gc
import json
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
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt_pretrain.py"


class HookState:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.reset()

    def reset(self):
        self.calls, self.bytes, self.durations, self.bucket_bytes = 0, 0, [], []
        self.first_launch = self.last_done = None


def counting_allreduce_hook(state: HookState, bucket):
    """DDP's default allreduce hook, plus a byte count and a launch-to-completion time per bucket."""
    buffer = bucket.buffer()
    nbytes = buffer.numel() * buffer.element_size()
    state.calls += 1
    state.bytes += nbytes
    state.bucket_bytes.append(nbytes)
    launched = time.perf_counter()
    if state.first_launch is None:
        state.first_launch = launched
    future = dist.all_reduce(buffer.div_(state.world_size), async_op=True).get_future()

    def done(fut):
        now = time.perf_counter()
        state.durations.append(now - launched)
        state.last_done = now
        return fut.value()[0]

    return future.then(done)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per_device_batch", type=int, default=6, help="sequences per process (6: global batch 12 on 2)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=8, help="timed blocks per mode")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--cache_dir", help="the recipe's token cache (default: the recipe's, ~/.cache/accel-dp/tokens)")
    p.add_argument("--json", help="also write rank 0's result here")
    p.add_argument("--quick", action="store_true", help="a few steps only: checks that it runs")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.steps = 2, 2, 3

    from accelerate import Accelerator
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    recipe = load_recipe(RECIPE)
    cache_args = ["--cache_dir", args.cache_dir] if args.cache_dir else []
    rargs = recipe.parse_args([*cache_args, "--per_device_train_batch_size", str(args.per_device_batch)])
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="no",
        gradient_accumulation_steps=1,
        step_scheduler_with_optimizer=False,
    )
    world = accelerator.num_processes
    if world < 2:
        print("error: run this under 2 or more processes (see the usage at the top of the file)", file=sys.stderr)
        return 2
    cache_entry, meta = recipe.prepare_token_cache(rargs, builds=accelerator.is_local_main_process)
    train_tokens = np.memmap(cache_entry / "train.bin", dtype=meta["dtype"], mode="r")
    tokenizer = AutoTokenizer.from_pretrained(cache_entry / "tokenizer")

    # The recipe's model, optimizer, schedule and loader with its defaults.
    shape = dict(recipe.MODEL_PRESETS[rargs.model_size])
    config = GPT2Config(
        vocab_size=meta["vocab_size"],
        n_positions=shape["block_size"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=shape["dropout"],
        embd_pdrop=shape["dropout"],
        attn_pdrop=shape["dropout"],
        bos_token_id=tokenizer.bos_token_id,
        activation_function="gelu_pytorch_tanh",  # as the recipe
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(rargs.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=rargs.attn_implementation)
    parameters = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in parameters)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": rargs.weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=rargs.learning_rate,
        betas=(rargs.adam_beta1, rargs.adam_beta2),
    )
    total = args.warmup + 2 * args.rounds * args.steps
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=10, num_training_steps=total, min_lr=rargs.learning_rate / 10
    )
    windows = recipe.TokenWindows(train_tokens, shape["block_size"])
    generator = torch.Generator().manual_seed(rargs.seed)
    sampler = torch.utils.data.RandomSampler(
        windows, replacement=True, num_samples=total * args.per_device_batch * world, generator=generator
    )
    loader = torch.utils.data.DataLoader(
        windows, batch_size=args.per_device_batch, sampler=sampler, generator=generator
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = HookState(world)
    model.register_comm_hook(state, counting_allreduce_hook)
    batches = iter(loader)

    def step(sync: bool) -> None:
        inputs, targets = next(batches)
        if sync:  # the recipe's step
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(input_ids=inputs).logits.float().flatten(0, 1), targets.flatten())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), rargs.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:  # the same step with no all-reduce: each process on its own
            with model.no_sync():
                loss = F.cross_entropy(model(input_ids=inputs).logits.float().flatten(0, 1), targets.flatten())
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), rargs.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    for _ in range(args.warmup):
        step(True)
    times = {"sync": [], "no_sync": []}
    per_step_bytes, per_step_calls, comm_sum, comm_span = [], [], [], []
    for r in range(args.rounds):
        for mode in ("sync", "no_sync") if r % 2 == 0 else ("no_sync", "sync"):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                state.reset()
                step(mode == "sync")
                if mode == "sync":
                    per_step_bytes.append(state.bytes)
                    per_step_calls.append(state.calls)
                    comm_sum.append(sum(state.durations))
                    comm_span.append((state.last_done or 0.0) - (state.first_launch or 0.0))
                    bucket_bytes = list(state.bucket_bytes)
            times[mode].append((time.perf_counter() - start) / args.steps)

    # A bare all-reduce of the gradients' size, nothing else running.
    flat = torch.zeros(grad_bytes // 4, dtype=torch.float32)
    bare = []
    for i in range(5 + 30):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        if i >= 5:
            bare.append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "world_size": world,
        "threads_per_process": torch.get_num_threads(),
        "per_device_batch": args.per_device_batch,
        "global_batch": args.per_device_batch * world,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "param_grad_bytes": grad_bytes,
        "allreduce_bytes_per_step": statistics.median(per_step_bytes),
        "allreduce_bytes_per_step_min_max": [min(per_step_bytes), max(per_step_bytes)],
        "buckets_per_step": statistics.median(per_step_calls),
        "bucket_bytes": bucket_bytes,
        "step_s_sync": med["sync"],
        "step_s_no_sync": med["no_sync"],
        "step_s_sync_all": times["sync"],
        "step_s_no_sync_all": times["no_sync"],
        "exposed_comm_s": med["sync"] - med["no_sync"],
        "exposed_comm_share": (med["sync"] - med["no_sync"]) / med["sync"],
        "hook_allreduce_s_sum_per_step": statistics.median(comm_sum),
        "hook_allreduce_span_per_step": statistics.median(comm_span),
        "hook_allreduce_share": statistics.median(comm_sum) / med["sync"],
        "bare_allreduce_s": statistics.median(bare),
        "bare_allreduce_GBps": grad_bytes / statistics.median(bare) / 1e9,
    }
    if accelerator.is_main_process:
        print("PROBE_RESULT " + json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    # The DDP reducer holds the Python hook: free it before the process group goes, or the exit aborts.
    model = optimizer = loader = scheduler = batches = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
