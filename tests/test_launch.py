"""`accel-dp run` builds the right `accelerate launch` command for each topology, and refuses bad requests."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CONFIGS_DIR, RECIPES_DIR, REPO_ROOT

from accel_dp.errors import UsageError
from accel_dp.launch import RunOptions, build_launch, parse_nodes

RECIPE = RECIPES_DIR / "gpt_pretrain.py"


def build(gpus_available: int = 0, **options):
    return build_launch(RECIPE, RunOptions(**options), gpus_available=gpus_available, python="python")


def flag(argv: list[str], name: str) -> str | None:
    """The value given to a launcher flag (only flags before the recipe path belong to the launcher)."""
    launcher_args = argv[: argv.index(str(RECIPE))]
    return launcher_args[launcher_args.index(name) + 1] if name in launcher_args else None


def recipe_args(argv: list[str]) -> list[str]:
    return argv[argv.index(str(RECIPE)) + 1 :]


def test_no_gpu_and_no_flags_runs_one_cpu_process():
    launch = build(gpus_available=0)
    assert launch.argv[:3] == ["python", "-m", "accel_dp.runner"]  # accelerate's launcher, run by accel-dp
    assert flag(launch.argv, "--config_file") == str(CONFIGS_DIR / "cpu.yaml")
    assert flag(launch.argv, "--num_processes") == "1"
    assert launch.env == {"ACCELERATE_USE_CPU": "1"}
    assert "1 CPU process" in launch.summary


def test_gpu_machine_with_no_flags_uses_all_its_gpus():
    launch = build(gpus_available=4)
    assert flag(launch.argv, "--config_file") == str(CONFIGS_DIR / "multi_gpu.yaml")
    assert flag(launch.argv, "--num_processes") == "4"
    assert launch.env == {}


def test_one_gpu_uses_the_single_gpu_config():
    launch = build(gpus_available=8, gpus=1)
    assert flag(launch.argv, "--config_file") == str(CONFIGS_DIR / "single_gpu.yaml")
    assert flag(launch.argv, "--num_processes") == "1"


def test_cpu_procs_uses_the_multi_cpu_config_and_the_cpu_switch():
    # `accelerate launch --cpu --num_processes 2` silently runs one process: the launch must not use --cpu.
    launch = build(cpu=True, procs=2, gpus_available=8)
    assert "--cpu" not in launch.argv
    assert flag(launch.argv, "--config_file") == str(CONFIGS_DIR / "multi_cpu.yaml")
    assert flag(launch.argv, "--num_processes") == "2"
    assert launch.env["ACCELERATE_USE_CPU"] == "1"


def test_multi_node_passes_total_processes_rank_and_rendezvous_address():
    launch = build(gpus_available=8, gpus=8, nodes=2, node_rank=1, main_ip="10.0.0.1", main_port=29555)
    assert flag(launch.argv, "--config_file") == str(CONFIGS_DIR / "multi_node.yaml")
    assert flag(launch.argv, "--num_processes") == "16"  # accelerate counts processes over all machines
    assert flag(launch.argv, "--num_machines") == "2"
    assert flag(launch.argv, "--machine_rank") == "1"
    assert flag(launch.argv, "--main_process_ip") == "10.0.0.1"
    assert flag(launch.argv, "--main_process_port") == "29555"


def test_explicit_config_name_or_path_wins(tmp_path: Path):
    assert flag(build(gpus_available=8, config="fsdp").argv, "--config_file") == str(CONFIGS_DIR / "fsdp.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\n")
    assert flag(build(gpus_available=8, config=str(own)).argv, "--config_file") == str(own.resolve())


def test_own_config_keeps_its_process_counts_unless_topology_flags_are_given(tmp_path: Path):
    own = tmp_path / "four.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    assert flag(build(gpus_available=4, config=str(own)).argv, "--num_processes") is None
    assert flag(build(gpus_available=4, config=str(own), gpus=2).argv, "--num_processes") == "2"
    # A single-process config on a many-GPU machine, with no topology flags, is just that config.
    assert flag(build(gpus_available=8, config="single_gpu").argv, "--num_processes") is None


def test_the_banner_counts_the_processes_the_config_starts():
    """multi_gpu.yaml (8 processes) on a machine without a GPU runs 8 CPU processes: the banner and the threads per
    process say so, as the recipe's first line will; on a GPU machine it needs as many GPUs."""
    on_cpu = build_launch(RECIPE, RunOptions(config="multi_gpu"), gpus_available=0, python="python", cpu_cores=16)
    assert "8 CPU processes" in on_cpu.summary and flag(on_cpu.argv, "--num_processes") is None
    assert flag(on_cpu.argv, "--num_cpu_threads_per_process") == "2"
    assert "8 GPUs" in build(gpus_available=8, config="multi_gpu").summary
    with pytest.raises(UsageError, match=r"multi_gpu.yaml \(num_processes 8\) but this machine has 4 GPU\(s\)"):
        build(gpus_available=4, config="multi_gpu")


def test_a_config_path_is_never_swapped_for_a_bundled_config_of_that_name(tmp_path: Path):
    with pytest.raises(UsageError, match="not found"):
        build(gpus_available=8, config=str(tmp_path / "multi_gpu.yaml"))


def test_mixed_precision_goes_to_the_launcher_and_grad_accum_to_the_recipe():
    launch = build(gpus_available=2, mixed_precision="bf16", grad_accum=4, recipe_args=("--max_train_steps", "9"))
    assert flag(launch.argv, "--mixed_precision") == "bf16"
    assert recipe_args(launch.argv) == ["--gradient_accumulation_steps", "4", "--max_train_steps", "9"]


def test_shell_line_shows_the_environment_then_the_command():
    line = build(cpu=True, procs=2).shell_line()
    assert line.startswith("ACCELERATE_USE_CPU=1 python -m accel_dp.runner ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(gpus=2, gpus_available=1), "this machine has 1 GPU"),
        (dict(cpu=True, mixed_precision="fp16"), "use --mixed-precision bf16"),
        (dict(gpus_available=0, mixed_precision="fp16"), "fp16 does nothing on CPU"),
        (dict(config="no-such-config"), "config 'no-such-config' not found"),
        (dict(nodes=2), "needs --main-ip"),
        (dict(nodes=2, node_rank=2, main_ip="h"), "--node-rank must be between 0 and 1"),
        (dict(cpu=True, gpus=2), "contradict"),
        (dict(procs=2, gpus_available=2), "add --cpu"),
        (dict(cpu=True, procs=0), "--procs must be a positive integer"),
        (dict(gpus=0, gpus_available=2), "--gpus must be a positive integer"),
        (dict(grad_accum=0), "--grad-accum must be a positive integer"),
        (dict(grad_accum=2, recipe_args=("--gradient_accumulation_steps", "4")), "keep one"),
        (dict(cpu=True, procs=2, config="cpu"), "cpu.yaml runs a single process but 2 were asked for"),
        (dict(cpu=True, config="fsdp"), "needs GPUs"),
        (dict(cpu=True, config="deepspeed_zero3"), "needs GPUs"),
    ],
)
def test_bad_requests_are_refused_with_a_fix(options, message):
    gpus_available = options.pop("gpus_available", 0)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(gpus_available=gpus_available, **options)


def test_a_taken_default_port_is_swapped_for_a_free_one_but_a_chosen_or_shared_port_is_an_error():
    from accel_dp.launch import settle_main_port

    taken = {29500, 31000}.__contains__
    single = RunOptions(cpu=True, procs=2)
    assert settle_main_port(single, is_free=lambda p: not taken(p), pick=lambda: 40001).main_port == 40001
    assert settle_main_port(single, is_free=lambda p: True, pick=lambda: 40001).main_port is None  # left alone
    with pytest.raises(UsageError, match="port 31000 is already in use"):
        settle_main_port(replace(single, main_port=31000), is_free=lambda p: not taken(p), pick=lambda: 40001)
    two_nodes = RunOptions(cpu=True, procs=1, nodes=2, main_ip="10.0.0.1")
    with pytest.raises(UsageError, match="port 29500 is already in use"):  # every node must agree on it
        settle_main_port(two_nodes, is_free=lambda p: not taken(p), pick=lambda: 40001)
    assert settle_main_port(replace(two_nodes, node_rank=1), is_free=lambda p: False) == replace(two_nodes, node_rank=1)


def test_a_cpu_config_runs_on_cpu_also_on_a_gpu_machine_without_cpu_flag():
    """--config multi_cpu (use_cpu: true) without --cpu on a machine with GPUs: the processes are told to use the CPU
    (else they would take the GPUs), and --procs counts them."""
    launch = build_launch(REPO_ROOT / "recipes" / "gpt_pretrain.py", RunOptions(config="multi_cpu", procs=2), 8,
                          python="python", cpu_cores=16)  # fmt: skip
    assert launch.env == {"ACCELERATE_USE_CPU": "1"} and "2 CPU processes" in launch.summary
    argv = launch.argv
    assert argv[argv.index("--num_cpu_threads_per_process") + 1] == "8"  # accelerate's rule, passed: no warning


def test_max_restarts_goes_to_torchs_elastic_agent_for_several_processes_of_one_node():
    assert flag(build(cpu=True, procs=2, max_restarts=3).argv, "--max_restarts") == "3"
    assert flag(build(gpus_available=8, gpus=8, max_restarts=1).argv, "--max_restarts") == "1"
    assert flag(build(cpu=True, procs=2).argv, "--max_restarts") is None
    with pytest.raises(UsageError, match="accelerate starts for 2 or more processes"):
        build(cpu=True, procs=1, max_restarts=1)  # (accelerate's one-process launcher has no agent)
    with pytest.raises(UsageError, match="needs the recipe's --output_dir, the same folder on a file system"):
        build(cpu=True, procs=2, nodes=2, main_ip="10.0.0.1", max_restarts=1)  # (a dated default differs per node)
    with pytest.raises(UsageError, match="--max-restarts must be 0 or more, got -1"):
        build(cpu=True, procs=2, max_restarts=-1)


def test_a_node_range_is_torchruns_elastic_membership_over_a_c10d_rendezvous_the_main_node_hosts():
    """--nodes MIN:MAX: accelerate's arguments with --num_machines MIN:MAX (the runner hands torchrun the range), the
    c10d rendezvous (hosted by node 0, joined by the others), restarts by default, and every start continuing the
    folder's newest checkpoint (a re-formed group is not a counted restart)."""
    two = ("--output_dir", "/shared/run")
    main = build(cpu=True, procs=1, nodes=3, min_nodes=1, main_ip="10.0.0.1", recipe_args=two)
    assert flag(main.argv, "--num_machines") == "1:3" and flag(main.argv, "--num_processes") == "3"
    assert flag(main.argv, "--rdzv_backend") == "c10d" and flag(main.argv, "--rdzv_conf") == "is_host=true"
    assert flag(main.argv, "--max_restarts") == "3" and "1 to 3 nodes" in main.summary
    assert recipe_args(main.argv) == [*two, "--resume_from_checkpoint", "latest"]
    own = (*two, "--resume_from_checkpoint", "/x/step-4")
    other = build(cpu=True, procs=1, nodes=3, min_nodes=2, node_rank=2, main_ip="10.0.0.1", max_restarts=5,
                  rdzv_conf="last_call_timeout=5", recipe_args=own)  # fmt: skip
    assert flag(other.argv, "--num_machines") == "2:3" and flag(other.argv, "--max_restarts") == "5"
    assert flag(other.argv, "--rdzv_conf") == "is_host=false,last_call_timeout=5"
    assert recipe_args(other.argv) == list(own)  # (the user's own kept)
    fixed = build(cpu=True, procs=2, nodes=2, main_ip="10.0.0.1", max_restarts=1, recipe_args=two)
    assert flag(fixed.argv, "--num_machines") == "2:2" and flag(fixed.argv, "--rdzv_backend") == "c10d"
    plain = build(cpu=True, procs=2, nodes=2, main_ip="10.0.0.1")
    assert flag(plain.argv, "--num_machines") == "2" and flag(plain.argv, "--rdzv_backend") is None


@pytest.mark.parametrize(
    "text, separator, expected",
    [("1", ":", (1, None)), ("4", ":", (4, None)), ("1:2", ":", (1, 2)), ("3:8", ":", (3, 8)), ("2-4", "-", (2, 4))],
)
def test_nodes_is_a_count_or_a_range(text, separator, expected):
    assert parse_nodes(text, separator) == expected


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("two", {}, "--nodes must be a number of nodes or a range MIN:MAX, got 'two'"),
        ("1:x", {}, "a range MIN:MAX, got '1:x'"),
        ("1:1", {}, "--nodes MIN:MAX needs MAX of 2 or more, got '1:1'"),
        ("3:2", {"main_ip": "10.0.0.1"}, "--nodes MIN:MAX needs 1 <= MIN <= MAX, got 3:2"),
        ("0:2", {"main_ip": "10.0.0.1"}, "--nodes MIN:MAX needs 1 <= MIN <= MAX, got 0:2"),
        ("1:2", {}, "--nodes > 1 needs --main-ip"),
        ("1", {"rdzv_conf": "join_timeout=9"}, "--rdzv-conf sets the rendezvous of --nodes MIN:MAX"),
    ],
)
def test_a_bad_node_range_is_one_line(text, options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        fewest, most = parse_nodes(text)
        nodes, min_nodes = (fewest, None) if most is None else (most, fewest)
        build(cpu=True, procs=1, nodes=nodes, min_nodes=min_nodes, recipe_args=("--output_dir", "o"), **options)
