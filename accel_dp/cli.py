"""The `accel-dp` command line: list and copy recipes, list configs, launch a recipe on any topology."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .configs import describe_config, list_configs
from .errors import UsageError
from .launch import (
    RunOptions,
    build_launch,
    detect_cpu_cores,
    detect_gpus,
    has_flag,
    parse_nodes,
    settle_main_port,
    with_output_dir,
)
from .recipes import get_recipe, list_recipes

app = typer.Typer(
    help="Data-parallel language-model training recipes on Hugging Face Accelerate.\n\n"
    "Example: accel-dp run gpt-pretrain --cpu --procs 2 -- --max_train_steps 200",
    no_args_is_help=True,
    add_completion=True,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"error: {message}", style="red", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def check_mixed_precision(mixed_precision: str | None) -> None:
    if mixed_precision is not None and mixed_precision not in ("no", "bf16", "fp16", "fp8"):
        fail(f"--mixed-precision {mixed_precision!r} is not one of no, bf16, fp16, fp8")


def default_output_dir(recipe: str) -> Path:
    """A run's fixed folder when accel-dp names it (a restarted or requeued run resumes there): absolute, dated."""
    return Path.cwd() / "runs" / f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}"


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of recipe names."""
    return [recipe.name for recipe in list_recipes() if recipe.name.startswith(incomplete)]


def complete_config(incomplete: str) -> list[str]:
    """Shell completion of bundled config names (a path completes as a file, by the shell)."""
    return [path.stem for path in list_configs() if path.stem.startswith(incomplete)]


def version_callback(value: bool) -> None:
    if value:
        console.print(f"accel-dp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Data-parallel language-model training recipes on Hugging Face Accelerate."""


@app.command("list")
def list_command() -> None:
    """List the recipes.

    Example: accel-dp list
    """
    table = Table("recipe", "what it does", box=None, header_style="bold")
    for recipe in list_recipes():
        table.add_row(recipe.name, recipe.description)
    console.print(table)


@app.command("configs")
def configs_command() -> None:
    """List the bundled accelerate configs and what each is for.

    Example: accel-dp configs
    """
    table = Table("config", "when to use it", box=None, header_style="bold")
    for path in list_configs():
        table.add_row(path.stem, describe_config(path))
    console.print(table)


@app.command("copy")
def copy_command(
    recipe: str = typer.Argument(..., help="Recipe name, e.g. gpt-pretrain.", autocompletion=complete_recipe),
    dest: Path = typer.Argument(..., help="A folder, or the file name to give the recipe (its modules go beside it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Copy a recipe and the modules it imports into your own project: the folder trains alone.

    Example: accel-dp copy gpt-pretrain ./my_project/train.py
    """
    try:
        found = get_recipe(recipe)
    except UsageError as err:
        fail(str(err))
    # A destination ending in .py (and not an existing folder) names the recipe's file; anything else is a folder.
    target = dest if dest.suffix == ".py" and not dest.is_dir() else dest / found.path.name
    if target.parent.exists() and not target.parent.is_dir():
        fail(f"{target.parent} is a file: give a folder or a .py file name")
    copies = [(found.path, target), *((module, target.parent / module.name) for module in found.modules())]
    links = [str(to) for _, to in copies if to.is_symlink()]
    if links:  # (copying would write wherever the link points, outside the destination)
        fail(
            f"{', '.join(links)}: a symbolic link; accel-dp copy never writes through one: remove it or choose another "
            "destination"
        )
    existing = [str(to) for _, to in copies if to.exists()]
    if existing and not force:
        fail(f"{', '.join(existing)} already exist(s): choose another destination or pass --force")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for source, to in copies:
            shutil.copyfile(source, to)
    except OSError as error:
        fail(f"cannot write into {target.parent} ({error.strerror}): choose another destination")
    console.print(f"copied {found.name} to {target.parent}: " + ", ".join(to.name for _, to in copies))


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run_command(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe name (see `accel-dp list`).", autocompletion=complete_recipe),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs per node (default: all of this machine's)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on CPU processes (gloo), even if GPUs are present."),
    procs: int | None = typer.Option(None, "--procs", help="CPU processes per node, with --cpu (default 1)."),
    nodes: str = typer.Option(
        "1",
        "--nodes",
        help="Number of machines, or MIN:MAX to go on with as few as MIN when nodes leave, and take "
        "them back when they return (restarts from the latest checkpoint).",
    ),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's rank, 0 to nodes-1."),
    main_ip: str | None = typer.Option(None, "--main-ip", help="Address of the node with rank 0."),
    main_port: int | None = typer.Option(
        None, "--main-port", help="Port on the main node (default 29500; on one machine a free one if that is taken)."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="A bundled config name (see `accel-dp configs`) or a YAML path.",
        autocompletion=complete_config,
    ),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="no, bf16, fp16 (GPU only) or fp8."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    max_restarts: int = typer.Option(
        0, "--max-restarts", help="Restart every process from the latest checkpoint when one fails, this often at most."
    ),
    rdzv_conf: str = typer.Option(
        "", "--rdzv-conf", help="torch's rendezvous settings across nodes under restarts, e.g. last_call_timeout=30."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and environment; run nothing."),
) -> None:
    """Launch a recipe. The recipe's own arguments go after `--` (a flag accel-dp does not know goes on too).

    Examples:
      accel-dp run gpt-pretrain
      accel-dp run gpt-pretrain --gpus 8 -- --model_size gpt2
      accel-dp run glue-bert --cpu --procs 2 -- --task sst2
    """
    check_mixed_precision(mixed_precision)
    try:
        found = get_recipe(recipe)
        recipe_path, recipe_args, restart_dir = found.path, tuple(ctx.args), None
        fewest, most = parse_nodes(nodes)
        max_nodes, min_nodes = (fewest, None) if most is None else (most, fewest)
        # A restart resumes where the first attempt wrote: a fixed folder, unless the recipe's arguments name one
        # (across nodes the user names it: a folder every node shares).
        if max_restarts and max_nodes == 1 and not has_flag(recipe_args, "--output_dir"):
            restart_dir = str(default_output_dir(found.name))
            recipe_args = with_output_dir(recipe_args, restart_dir)
        options = RunOptions(
            gpus=gpus,
            cpu=cpu,
            procs=procs,
            nodes=max_nodes,
            min_nodes=min_nodes,
            node_rank=node_rank,
            main_ip=main_ip,
            main_port=main_port,
            config=config,
            mixed_precision=mixed_precision,
            grad_accum=grad_accum,
            max_restarts=max_restarts,
            rdzv_conf=rdzv_conf,
            recipe_args=recipe_args,
        )
        # Without --gpus and --cpu, look at the machine; with --dry-run, assume it has what was asked for.
        needs_machine = not cpu and not (dry_run and gpus is not None)
        gpus_available = detect_gpus() if needs_machine else (gpus or 0)
        if not dry_run:
            options = settle_main_port(options)
        launch = build_launch(recipe_path, options, gpus_available, cpu_cores=detect_cpu_cores())
    except UsageError as err:
        fail(str(err))
    if dry_run:
        console.print(launch.shell_line(), highlight=False, soft_wrap=True)
        return
    hint = (
        " (no GPU found; add --cpu --procs N for several CPU processes)"
        if gpus is None and not cpu and gpus_available == 0
        else ""
    )
    if restart_dir:
        hint += f", in {restart_dir}"
    err_console.print(f"accel-dp: running {launch.summary}{hint}", highlight=False, soft_wrap=True)
    from .runner import run  # accelerate's launcher in this process: the recipe's exit status and error line

    raise typer.Exit(run(launch.launcher_args, launch.env))


@app.command(
    "prepare",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def prepare_command(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe name (see `accel-dp list`).", autocompletion=complete_recipe),
) -> None:
    """Prepare a recipe's data before training: tokenize the corpus into the token cache, once, on every core.

    Arguments after `--` go to the recipe: the data and tokenizer flags of the training run, which then finds the
    cache and starts at once. Before a job on several machines, run it once where they share the cache folder.

    Example: accel-dp prepare gpt-pretrain -- --train_file corpus.txt --tokenizer bpe:8192
    """
    try:
        found = get_recipe(recipe)
        if not found.accepts_flag("--prepare_only"):
            raise UsageError(f"{found.name} has no data to prepare: it tokenizes as it trains")
        options = RunOptions(cpu=True, recipe_args=(*ctx.args, "--prepare_only"))
        launch = build_launch(found.path, options, gpus_available=0, cpu_cores=detect_cpu_cores())
    except UsageError as err:
        fail(str(err))
    from .runner import run

    raise typer.Exit(run(launch.launcher_args, launch.env))


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders: each a recipe's --output_dir with metrics.jsonl."),
    output: Path = typer.Option(
        Path("report.html"),
        "--output",
        "-o",
        help="The HTML page to write (its PNG goes beside it, same name), or a folder for report.html and report.png.",
    ),
) -> None:
    """Plot the curves of one or more runs and write an HTML report.

    Loss, evaluation metrics (a panel per unit), throughput, TFLOP/s and learning rate per optimizer step, the runs
    overlaid, in one PNG, each axis labelled with its unit; the page shows it with a table of each run's final numbers
    (its all_results.json), one row per run and one number format per column.

    Example: accel-dp report runs/one-proc runs/two-procs --output compare.html
    """
    from .report import write_report  # matplotlib only when a report is asked for

    try:
        html_path, figure = write_report(run_dirs, output)
    except UsageError as err:
        fail(str(err))
    console.print(f"wrote {html_path} and {figure.path.name} ({len(figure.series)} curves)", highlight=False)


@app.command("env")
def env_command() -> None:
    """Print this machine's setup as Markdown, to paste into a bug report.

    Versions, devices, distributed backends, accelerate's default config, Hugging Face offline mode and whether the
    Hub answers (a check of 2 s at most, skipped when HF_HUB_OFFLINE=1).

    Example: accel-dp env > environment.md
    """
    from .env import collect_environment, format_environment

    typer.echo(format_environment(collect_environment()), nl=False)  # plain text: no colour codes to paste


@app.command("sample")
def sample_command(
    run_dir: Path = typer.Argument(..., help="A gpt-pretrain run's --output_dir (the saved model and tokenizer)."),
    prompt: str = typer.Option("\n", "--prompt", help="Text to continue (default: a new line).", show_default=False),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="How many tokens to generate."),
    temperature: float = typer.Option(
        0.8, "--temperature", help="Lower is more predictable; 0 always takes the likeliest."
    ),
    top_k: int = typer.Option(200, "--top-k", help="Sample among the k likeliest tokens; 0 for all."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for a reproducible sample."),
) -> None:
    """Generate text with a model trained by gpt-pretrain.

    The model and tokenizer load with transformers' from_pretrained; past the model's context (--block_size),
    generation goes on from the newest half of its window.

    Example: accel-dp sample runs/gpt-pretrain-20250101-120000 --prompt "ROMEO:" --max-new-tokens 300 --seed 1
    """
    from .sample import check_gpt_run, check_sampling_options, generate_text, load_gpt_run

    try:
        check_sampling_options(max_new_tokens, temperature, top_k)
        check_gpt_run(run_dir)  # before importing torch and transformers: a wrong folder fails at once
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no "Loading weights" bar above the sample
        model, tokenizer = load_gpt_run(run_dir)
        seen_prompt, continuation = generate_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)
    except UsageError as err:
        fail(str(err))
    if seen_prompt != prompt:
        err_console.print(
            f"note: the tokenizer does not know every character of the prompt; the model saw {seen_prompt!r}",
            highlight=False,
            soft_wrap=True,
        )
    typer.echo(seen_prompt + continuation)


@app.command(
    "slurm",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def slurm_command(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe name (see `accel-dp list`).", autocompletion=complete_recipe),
    nodes: str = typer.Option(
        "1", "--nodes", help="Number of nodes, or a range MIN-MAX: a requeued job may then get fewer."
    ),
    gpus_per_node: int | None = typer.Option(
        None, "--gpus", "--gpus-per-node", help="GPUs (and processes) per node, as in `accel-dp run`."
    ),
    cpu: bool = typer.Option(False, "--cpu", help="CPU nodes: processes over gloo instead of GPUs."),
    procs_per_node: int | None = typer.Option(
        None, "--procs", "--procs-per-node", help="CPU processes per node, with --cpu."
    ),
    config: str | None = typer.Option(
        None, "--config", help="A bundled config name or a YAML path.", autocompletion=complete_config
    ),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="no, bf16, fp16 or fp8."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    main_port: int | None = typer.Option(
        None, "--main-port", help="Port on the main node (default: 20000 + job id mod 20000)."
    ),
    output_dir: str | None = typer.Option(
        None, "--output-dir", help="The run's fixed folder (default: ./runs/RECIPE-DATE-TIME, made absolute)."
    ),
    job_name: str | None = typer.Option(None, "--job-name", help="Slurm job name (default: the recipe's)."),
    time_limit: str | None = typer.Option(None, "--time", help="Slurm time limit, e.g. 04:00:00."),
    partition: str | None = typer.Option(None, "--partition", help="Slurm partition."),
    account: str | None = typer.Option(None, "--account", help="Slurm account."),
    cpus_per_task: int | None = typer.Option(None, "--cpus-per-task", help="CPU cores per node's launcher task."),
    signal_seconds: int = typer.Option(
        120, "--signal-seconds", help="Seconds before the time limit at which the job checkpoints and requeues."
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", help="Restart every process from the latest checkpoint when one fails, this often at most."
    ),
) -> None:
    """Print an sbatch script that runs a recipe on Slurm nodes.

    srun starts accel-dp's runner (accelerate's launcher, as accel-dp run uses it) on every node. On preemption, or
    --signal-seconds before the time limit, the recipe checkpoints and the job requeues and resumes. Arguments after
    `--` go to the recipe.

    Example: accel-dp slurm gpt-pretrain --nodes 2 --gpus 8 --time 04:00:00 -- --model_size gpt2 > job.sh
    """
    from .slurm import SlurmJob, build_sbatch_script

    check_mixed_precision(mixed_precision)
    try:
        found = get_recipe(recipe)
        can_resume = found.accepts_flag("--resume_from_checkpoint")
        default_output = default_output_dir(found.name)
        min_nodes, max_nodes = parse_nodes(nodes, separator="-")
        job = SlurmJob(
            nodes=min_nodes,
            max_nodes=max_nodes,
            gpus_per_node=gpus_per_node,
            cpu=cpu,
            procs_per_node=procs_per_node,
            job_name=job_name or found.name,
            output_dir=output_dir or str(default_output),
            main_port=main_port,
            signal_seconds=signal_seconds,
            time_limit=time_limit,
            partition=partition,
            account=account,
            cpus_per_task=cpus_per_task,
        )
        run = RunOptions(
            config=config,
            mixed_precision=mixed_precision,
            grad_accum=grad_accum,
            max_restarts=max_restarts,
            recipe_args=tuple(ctx.args),
        )
        script = build_sbatch_script(
            found.path, found.name, job, run, can_resume=can_resume, generated_by=f"accel-dp {__version__} slurm"
        )
    except UsageError as err:
        fail(str(err))
    typer.echo(script.text, nl=False)  # plain: rich would read [brackets] in it as markup
