"""The training step's machinery, shared by the recipes: the optimizer and its schedule, the step with clipping and
the non-finite decision, Local SGD, and pretrained weights loaded in fp32.

    make_optimizer      AdamW (weight decay on matrices only) and transformers' LR schedule, in optimizer steps
    optimizer_step      inside `accelerator.accumulate`: clip, then step unless the gradient is NaN or inf
    Step                what one optimizer step did, for the non-finite policy and the meter
    NonFinitePolicy     a NaN or inf step: skipped up to --nonfinite_skip_limit, else the run stops
    LocalSGD            --local_sgd_steps: replicas step alone and are averaged every K steps
    load_pretrained     from_pretrained in fp32, its load report as one line
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from accelerate import Accelerator
from faults import fail, stop
from messages import first_line, logger


def make_optimizer(
    model,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    schedule: str,
    num_warmup_steps: int,
    num_training_steps: int,
    mixed_precision: str = "no",
    **schedule_options,
):
    """AdamW with weight decay on matrices (2-D weights) only, never on biases and LayerNorm parameters (GPT-2's and
    BERT's recipe alike), and transformers' LR schedule `schedule` with linear warmup, counted in optimizer steps.

    AdamW is torch's fused implementation (one kernel for all parameters, on CPU and GPU: 7 % of a CPU step of the
    nano GPT, about 3 % on GPUs by nanoGPT's and llm.c's reports), except under fp16, whose loss scaler must see
    every step to skip an overflowing one and count it (the recipes' skip accounting): there it is foreach."""
    from transformers import get_scheduler

    fused = mixed_precision != "fp16"
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=betas,
        fused=fused or None,
        foreach=None if fused else True,
    )
    lr_scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=schedule_options,
    )
    return optimizer, lr_scheduler


class Step(NamedTuple):
    """What one optimizer step did, for the guard and the meter: this process's summed loss over its examples (on
    the device, not read back), the items it trained on (tokens or samples) and their FLOPs, and the norm of the
    averaged gradient with whether it was finite (then the optimizer stepped)."""

    loss_sum: torch.Tensor
    examples: torch.Tensor | int
    items: int
    flops: float
    grad_norm: torch.Tensor | float | None
    finite: bool


def optimizer_step(accelerator: Accelerator, model, optimizer, max_grad_norm: float) -> tuple[bool, object]:
    """Call inside `accelerator.accumulate(model)` after the backward. At the last micro-batch of an optimizer step
    (accelerate's sync_gradients): clip the averaged gradient and step, unless its norm is NaN or inf, which leaves the
    weights as they were. The norm is the same on every process, so all decide alike. Returns (finite, norm)."""
    finite, grad_norm = True, None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        # DeepSpeed returns a float (None before its first step) and clips and steps inside its engine; fp16's loss
        # scaler skips an overflowing step by itself and lowers its scale, so neither is a non-finite step here.
        finite = grad_norm is None or math.isfinite(float(grad_norm)) or accelerator.scaler is not None
    if finite:
        optimizer.step()  # a no-op on the micro-batches before the last
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


class NonFinitePolicy:
    """A step whose gradient norm is NaN or inf left the weights as they were (optimizer_step). It is skipped, up to
    `limit` (--nonfinite_skip_limit), each skip a record in the run's log; the next stops the run before anything (a
    checkpoint, the final model) is written from a broken state. `last_checkpoint` names the checkpoint to go back
    to. Its count travels in checkpoints (state_dict)."""

    def __init__(self, limit: int, log: Callable[[dict, str], None], last_checkpoint: Callable[[], str | None]):
        self.limit, self.log, self.last_checkpoint = limit, log, last_checkpoint
        self.skipped_steps = 0

    def check(self, step: int, result: Step) -> None:
        if result.finite:
            return
        self.skipped_steps += 1
        if self.skipped_steps > self.limit:
            used_up = f"all {self.limit} skips that --nonfinite_skip_limit allows are used up"
            skips = used_up if self.limit else "or allow skips with --nonfinite_skip_limit N"
            stop(
                f"gradient norm is {float(result.grad_norm)} at optimizer step {step}; stopped without saving (last "
                f"checkpoint: {self.last_checkpoint() or 'none'}). Lower --learning_rate, check the data, {skips}"
            )
        self.log(
            {"step": step, "skipped_nonfinite_step": self.skipped_steps},
            f"step {step}: gradient norm {float(result.grad_norm)}, step skipped ({self.skipped_steps}/{self.limit})",
        )

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]


class LocalSGD:
    """--local_sgd_steps K: each process steps on its own gradient (DDP's all-reduce off: accelerate's no_sync for the
    whole loop) and the replicas' parameters are averaged (accelerate's reduce) every K optimizer steps, and before
    evaluation, checkpoints and the save. Averaging is keyed to the step number, so a resumed run averages at the same
    steps; leaving the `with` averages only when no exception is in flight (an average is a collective, which a lost
    process would hang). Disabled, with one process or without K, every method does nothing."""

    def __init__(self, accelerator: Accelerator, model, every: int | None):
        self.accelerator, self.model, self.every = accelerator, model, every
        self.enabled = bool(every) and accelerator.num_processes > 1
        self.contexts = contextlib.ExitStack()

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self.contexts.enter_context(self.accelerator.no_sync(self.model))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.average()
        self.contexts.close()

    def step(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            self.average()

    def average(self) -> None:
        if self.enabled:
            parameters = list(self.model.parameters())  # one all-reduce for all, copied back in place
            mean = self.accelerator.reduce(torch.nn.utils.parameters_to_vector(parameters), reduction="mean")
            for parameter, averaged in zip(parameters, mean.split([p.numel() for p in parameters]), strict=True):
                parameter.data.copy_(averaged.view_as(parameter))


def compile_in_place(model) -> None:
    """--torch_compile (transformers' TrainingArguments flag): the module compiles its own forward in place, inside
    DDP, so its parameters keep their names: no `_orig_mod.` in checkpoints or saved weights, and a compiled run's
    checkpoint resumes uncompiled and the other way round. (accelerate's dynamo_backend wraps the model instead, and
    its checkpoints then carry the prefix.)"""
    model.compile()


def load_pretrained(auto_class, name_or_path: str, new_modules: tuple[str, ...] = (), **kwargs):
    """`auto_class.from_pretrained` with fp32 master weights, whatever the checkpoint holds (transformers keeps a bf16
    one in bf16, which fp16's loss scaler cannot unscale and in which AdamW's small updates round away):
    --mixed_precision casts. A checkpoint that cannot be loaded is a one-line error. transformers' LOAD REPORT table
    (with terminal colour codes, also in a log file) becomes one line naming the weights the checkpoint lacked, and
    none when those are the `new_modules` the recipe adds on purpose (a fresh classification head)."""

    def not_the_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addFilter(not_the_report)
    try:
        with no_transformers_progress_bars():
            model, info = auto_class.from_pretrained(
                name_or_path, dtype=torch.float32, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as e:
        fail(f"cannot load model '{name_or_path}': {first_line(e, 300)}")
    finally:
        reporter.removeFilter(not_the_report)
    mismatched = [key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"]]
    fresh = [key for key in info["missing_keys"] if not key.startswith(new_modules)] + mismatched
    if fresh:
        listed = ", ".join(map(str, fresh[:5])) + (", ..." if len(fresh) > 5 else "")
        logger.warning(f"{name_or_path}: {len(fresh)} weight(s) not in the checkpoint, initialised at random: {listed}")
    return model


@contextlib.contextmanager
def no_transformers_progress_bars():
    """transformers' "Loading weights" and "Writing model shards" bars, one per model: a moment on screen, and a
    line of carriage returns in a log file."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
