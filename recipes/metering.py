"""How fast and how big a run is: throughput, FLOPs and MFU, peak memory, and the memory a run will need.

`Meter` adds up each process's steps on the device (nothing read back per step) and reports at log steps; its
unlogged part travels in checkpoints (state_dict), also onto another number of processes. `FlopsPerToken` counts a
model's training FLOPs, `PEAK_TFLOPS` holds the devices' peaks that MFU is reported against, and `training_memory`
with `check_memory` refuse a run that cannot fit, within seconds of its start.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import TYPE_CHECKING, NamedTuple

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from faults import fail, stop

if TYPE_CHECKING:
    from training import Step


class Meter:
    """Training throughput and the mean loss since the last log. Each process adds up its own steps on the device
    (nothing is read back per step); a log step sums every process's part in one all-reduce. Evaluation and
    checkpoints are left out of the time (`with meter.paused("evaluation"):`)."""

    def __init__(self, accelerator: Accelerator, unit: str, start_time: float):
        self.accelerator, self.unit, self.start_time = accelerator, unit, start_time
        self.peak = peak_tflops(accelerator)
        self.dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        self.loss = torch.zeros(2, dtype=torch.float32, device=accelerator.device)  # summed loss, examples
        self.work = [0.0, 0.0]  # items (tokens or samples) and their FLOPs: this process's, since the last log
        self.totals = {"loss": 0.0, "examples": 0.0, "items": 0.0, "flops": 0.0, "seconds": 0.0}  # all processes
        self.last_loss, self.paused_seconds = None, {}
        self.window_start, self.window_paused = time.perf_counter(), 0.0

    def add(self, result: Step) -> None:
        if result.finite:  # a skipped step's loss is left out of the mean
            self.loss[0] += result.loss_sum
            self.loss[1] += result.examples
        self.work[0] += result.items
        self.work[1] += result.flops

    @contextlib.contextmanager
    def paused(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.window_paused += seconds
            self.paused_seconds[what] = self.paused_seconds.get(what, 0.0) + seconds

    def record(self, step: int) -> dict:
        """The record of a log step (every process must call it): loss, items/s, TFLOP/s, MFU, elapsed time."""
        now = time.perf_counter()
        seconds = max(now - self.window_start - self.window_paused, 1e-9)
        window = torch.cat(
            (self.loss.to(self.dtype), torch.tensor(self.work, dtype=self.dtype, device=self.loss.device))
        )
        loss_sum, examples, items, flops = self.accelerator.reduce(window, reduction="sum").tolist()
        self.loss.zero_()
        self.work, self.window_start, self.window_paused = [0.0, 0.0], now, 0.0
        for key, value in zip(self.totals, (loss_sum, examples, items, flops, seconds), strict=True):
            self.totals[key] += value
        record = {"step": step}
        if examples:  # (none when every step since the last log was skipped)
            self.last_loss = record["loss"] = loss_sum / examples
            if not math.isfinite(self.last_loss):
                stop(
                    f"the training loss became {self.last_loss} at step {step}: lower --learning_rate, or use "
                    "--mixed_precision bf16 instead of fp16"
                )
        record[f"{self.unit}_per_second"] = items / seconds
        record["tflops"] = flops / seconds / 1e12  # all processes together
        if self.peak:  # model FLOPs utilisation: the share of the devices' peak that trains the model
            record["mfu"] = record["tflops"] / (self.peak * self.accelerator.num_processes)
        record["elapsed_s"] = now - self.start_time
        return record

    def summary(self) -> dict:
        """The whole run (every process must call it): mean loss, training time, items/s, TFLOP/s, MFU, memory."""
        if any(self.work):
            self.record(step=-1)
        seconds = max(self.totals["seconds"], 1e-9)
        tflops = self.totals["flops"] / seconds / 1e12
        return {
            "train_loss": self.totals["loss"] / self.totals["examples"] if self.totals["examples"] else None,
            "train_runtime_s": self.totals["seconds"],  # training only: evaluation and checkpoints excluded
            **{f"{what}_runtime_s": s for what, s in self.paused_seconds.items()},
            f"{self.unit}_per_second": self.totals["items"] / seconds,
            "tflops": tflops,
            "peak_tflops_per_device": self.peak,
            "mfu": tflops / (self.peak * self.accelerator.num_processes) if self.peak else None,
            "peak_memory_gib": peak_memory_gib(self.accelerator),  # rank 0's: GPU memory on GPU, RSS on CPU
        }

    def state_dict(self) -> dict:
        """For a checkpoint (every process must call it): each process's unlogged part, gathered, and the totals."""
        windows = gather_object([[*self.loss.tolist(), *self.work]])
        seconds = time.perf_counter() - self.window_start - self.window_paused
        return {"windows": windows, "window_seconds": seconds, "totals": self.totals, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        """On another number of processes, the main process takes every process's unlogged part: the sums are what a
        log step reports."""
        windows = state["windows"]
        if len(windows) == self.accelerator.num_processes:
            mine = windows[self.accelerator.process_index]
        else:
            mine = (
                [sum(column) for column in zip(*windows, strict=True)]
                if self.accelerator.is_main_process
                else [0.0] * 4
            )
        self.loss = torch.tensor(mine[:2], dtype=torch.float32, device=self.loss.device)
        self.work = list(mine[2:])
        self.window_start, self.window_paused = time.perf_counter() - state["window_seconds"], 0.0
        self.totals, self.last_loss = dict(state["totals"]), state["last_loss"]


# Peak dense tensor-core TFLOP/s per GPU, (bf16/fp16, fp32), from the vendors' data sheets, matched by a part of
# torch.cuda.get_device_name(). MFU is reported only for a device listed here, never against a guessed peak:
# on CPU, or an unknown GPU, runs log achieved TFLOP/s only.
PEAK_TFLOPS = (
    ("H200", (989.0, 67.0)),
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),  # SXM
    ("GH200", (989.0, 67.0)),
    ("A100", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("A10G", (70.0, 31.2)),
    ("V100", (125.0, 15.7)),  # fp16; no bf16
)


def peak_tflops(accelerator: Accelerator) -> float | None:
    """This device's peak for the run's precision, or None where unknown (CPU included)."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    half = accelerator.mixed_precision in ("bf16", "fp16", "fp8")
    return next((peaks[0] if half else peaks[1] for part, peaks in PEAK_TFLOPS if part in name), None)


def peak_memory_gib(accelerator: Accelerator) -> float:
    """Peak GPU memory allocated by this process on GPU; peak resident memory (RSS) of this process on CPU."""
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def check_memory(accelerator: Accelerator, need: dict[str, float], what_to_lower: str) -> None:
    """Refuse, within seconds of the start, a run whose estimated memory per process (`need`: bytes by what they hold)
    cannot fit: the GPU's free memory on GPU, this machine's available RAM shared by its processes on CPU."""
    if accelerator.device.type == "cuda":
        free, where = torch.cuda.mem_get_info(accelerator.device)[0], "the GPU"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free, where = psutil.virtual_memory().available / local, f"this machine's RAM ({local} process(es) share it)"
    free = min(gather_object([free]))  # every process decides alike, on the tightest
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in need.items())
        fail(
            f"this run needs about {total / 2**30:.1f} GiB per process ({parts} GiB) but {where} has "
            f"{free / 2**30:.1f} GiB free: lower {what_to_lower}"
        )


class FlopsPerToken(NamedTuple):
    """Training FLOPs per token, forward and backward: 6 per weight the token meets in a matmul, plus attention's
    12 x layers x width x context (PaLM, appendix B; nanoGPT's estimate_mfu). Embedding tables are lookups and do
    not count, unless tied to an output layer (GPT-2's token embeddings are also its LM head's matmul)."""

    weights: int
    layers: int
    width: int

    @classmethod
    def of(cls, model) -> FlopsPerToken:
        matmuls = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - matmuls
        config = model.config  # transformers' attribute map gives GPT-2's n_layer and n_embd these names too
        weights = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
        return cls(weights, config.num_hidden_layers, config.hidden_size)

    def __call__(self, context: int) -> float:
        return 6 * self.weights + 12 * self.layers * self.width * context


def training_memory(
    accelerator: Accelerator, model, tokens: int, context: int, attention_materialised: bool, logits: int = 0
) -> dict[str, float]:
    """Bytes one process needs, roughly, for micro-batches of `tokens` tokens: fp32 weights, gradients and AdamW's two
    moments (16 per parameter, shared out under FSDP or DeepSpeed); the activations kept for the backward, about
    17 x width values per token and layer (Korthikanti et al. 2022), plus 2 x heads x context where attention is
    materialised (eager, and sdpa with attention dropout on CPU; sdpa's other kernels are linear in the context);
    and a causal LM's logits in fp32, kept for the loss and its gradient. tests/test_metering.py holds it within a
    factor of 2 of the peak RSS one step adds, on CPU, with and without attention dropout."""
    config = model.config
    value_bytes = 2 if accelerator.mixed_precision in ("bf16", "fp16") else 4
    values = 17 * config.hidden_size + (2 * config.num_attention_heads * context if attention_materialised else 0)
    shards = accelerator.num_processes if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") else 1
    need = {
        "weights, gradients and optimizer": 16 * sum(p.numel() for p in model.parameters()) / shards,
        "activations": tokens * config.num_hidden_layers * values * value_bytes,
    }
    if logits:  # the fp32 logit values held at once (a micro-batch's, or one chunk's when the loss is chunked)
        need["logits"] = 3 * logits * 4
    return need
