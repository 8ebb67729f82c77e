"""The accelerate configs in accelerate_configs/: valid for accelerate's own loader, documented, and multi_cpu.yaml
really starting several gloo processes on a CPU-only machine.

Measured with accelerate 1.15 on a CPU-only machine: no yaml alone gives N CPU processes.
`distributed_type: MULTI_CPU` uses the single-process launcher (N processes only through mpirun), and
`distributed_type: MULTI_GPU` + `use_cpu: true` starts N processes through torchrun but does not pass
ACCELERATE_USE_CPU to them, so each one runs alone as rank 0 of 1. ACCELERATE_USE_CPU=1 in the environment
(which `accel-dp run` sets for CPU runs) is what makes them join one gloo group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType
from conftest import CONFIGS_DIR, subprocess_env

from accel_dp import runner

EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, True),
    "multi_cpu.yaml": (DistributedType.MULTI_GPU, 2, True),
    "single_gpu.yaml": (DistributedType.NO, 1, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, False),
    "fsdp.yaml": (DistributedType.FSDP, 8, False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, False),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, False),
}
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_exactly_the_expected_configs_exist():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_accelerates_loader(path: Path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes, use_cpu = EXPECTED[path.name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.use_cpu is use_cpu
    # Quoted in the yaml: a bare `no` is YAML 1.1 for False.
    assert config.mixed_precision == "no"
    assert config.num_machines == (2 if path.name == "multi_node.yaml" else 1)
    if distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_starts_with_a_description_comment(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 10, lines[0]
    assert lines[1].startswith("#"), "a few comment lines on how to use it should follow"
    assert f"--config_file accelerate_configs/{path.name}" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "body, message",
    [
        ("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_procs: 2\n", "unknown keys"),
        ("distributed_type: MULTI_GPUS\nnum_processes: 2\n", "MULTI_GPUS"),
        ("num_processes: 2\n", "distributed_type"),
    ],
    ids=["unknown-key", "bad-distributed-type", "no-distributed-type"],
)
def test_loader_rejects_invalid_configs(tmp_path: Path, body: str, message: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_config_from_file(str(bad))


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator()
    total = acc.reduce(torch.tensor([float(acc.process_index + 1)]), reduction="sum").item()
    record = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "all_reduced": total,
    }
    with open(os.path.join(sys.argv[1], f"rank{os.getpid()}.json"), "w") as f:
        json.dump(record, f)
    acc.end_training()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_cpu_yaml_starts_two_gloo_processes(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS_DIR / "multi_cpu.yaml"),
        "--num_processes", "2",
        "--main_process_port", str(_free_port()),
        str(script), str(out),
    ]  # fmt: skip
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(records) == 2, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(r["rank"] for r in records) == [0, 1]
    for r in records:
        assert r["world_size"] == 2
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["backend"] == "gloo"
        assert r["all_reduced"] == 3.0  # 1 + 2: the processes really talked to each other
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_cli_overrides_win_over_the_yaml(path: Path):
    """The flags `accel-dp run` passes replace the yaml's values (checked with accelerate's own, private,
    argument resolution, which is what `accelerate launch` runs before choosing a launcher)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(path), "--num_processes", "4", "--num_machines", "2", "--machine_rank", "1"]
    argv += ["--main_process_ip", "10.1.2.3", "--main_process_port", "1234", "--mixed_precision", "bf16", "x.py"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.num_processes, args.num_machines, args.machine_rank) == (4, 2, 1)
    assert (args.main_process_ip, args.main_process_port, args.mixed_precision) == ("10.1.2.3", 1234, "bf16")
    distributed_type = EXPECTED[path.name][0]
    assert args.multi_gpu == (distributed_type == DistributedType.MULTI_GPU)
    assert args.use_fsdp == (distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed_type == DistributedType.DEEPSPEED)

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert args.num_processes == EXPECTED[path.name][1]
    assert args.mixed_precision == "no"


def test_one_gpu_config_leaves_the_visible_gpu_to_the_caller(tmp_path):
    """single_gpu.yaml must not pin GPU 0: under CUDA_VISIBLE_DEVICES=3 (or a Slurm allocation of one GPU) the
    process sees what the caller gave it. Through accelerate's launcher for real (no GPU is needed to see it)."""
    script = tmp_path / "show.py"
    script.write_text(f"import os; open({str(tmp_path / 'seen')!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "3"
    try:
        assert runner.run(["--config_file", str(CONFIGS_DIR / "single_gpu.yaml"), str(script)]) == 0
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES")
        if before is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
    assert (tmp_path / "seen").read_text() == "3"
