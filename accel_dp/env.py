"""`accel-dp env`: what a bug report needs to know about this machine, as plain text to paste.

`collect_environment` gathers the facts into a dict (versions, devices, distributed backends, accelerate's
default config, Hugging Face offline mode and whether the Hub answers); `format_environment` writes them as a
Markdown list. Neither prints; the Hub check is the only thing that touches the network, and it is skipped in
offline mode.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "accelerate", "transformers", "datasets", "tokenizers")
TRUE_VALUES = {"1", "on", "yes", "true"}
DEFAULT_HUB = "https://huggingface.co"
# Variables that change what a run does; shown when set.
RELEVANT_VARIABLES = (
    "CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS",
    "HF_HOME", "HF_ENDPOINT", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
)  # fmt: skip
CONFIG_KEYS = (
    "compute_environment", "distributed_type", "num_machines", "num_processes", "machine_rank", "main_process_ip",
    "main_process_port", "mixed_precision", "use_cpu", "gpu_ids", "dynamo_backend", "downcast_bf16",
)  # fmt: skip


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return {
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_cuda_version": torch.version.cuda,  # None for a CPU build of torch
        "mps_available": bool(mps and mps.is_available()),
        "cpu_count": os.cpu_count(),
    }


def distributed_backends() -> dict[str, bool]:
    import torch.distributed as dist

    if not dist.is_available():
        return {"gloo": False, "nccl": False, "mpi": False}
    return {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}


def accelerate_default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where `accelerate config` writes, and `accelerate launch` reads, the default config (accelerate's rule)."""
    cache = environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    hf_home = environ.get("HF_HOME", os.path.join(cache, "huggingface"))
    return Path(os.path.expanduser(hf_home)) / "accelerate" / "default_config.yaml"


def summarize_accelerate_config(path: Path) -> dict:
    """{"path", "exists"} and, for a readable file, the settings that decide the topology, or the read error."""
    summary: dict = {"path": str(path), "exists": path.is_file()}
    if not summary["exists"]:
        return summary
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of accelerate's JSON too
    except (OSError, yaml.YAMLError) as err:
        summary["error"] = str(err).splitlines()[0]
        return summary
    if not isinstance(loaded, dict):
        summary["error"] = "not a mapping of settings"
        return summary
    summary["settings"] = {key: loaded[key] for key in CONFIG_KEYS if key in loaded}
    summary["sections"] = sorted(k for k, v in loaded.items() if isinstance(v, dict) and v)  # fsdp_config, ...
    return summary


def is_offline(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


def check_hub(endpoint: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(reachable, what happened). Any HTTP answer counts as reachable. The whole check, name lookup included,
    is bounded by timeout_s: it runs in a daemon thread that is abandoned if it takes longer."""
    outcome: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s) as r:
                outcome.append((True, f"HTTP {r.status}"))
        except urllib.error.HTTPError as err:
            outcome.append((True, f"HTTP {err.code}"))
        except (urllib.error.URLError, OSError, ValueError) as err:
            outcome.append((False, str(getattr(err, "reason", err))))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.2)
    return outcome[0] if outcome else (False, f"no answer within {timeout_s:g} s")


def hub_status(environ: Mapping[str, str] = os.environ, timeout_s: float = 2.0) -> dict:
    endpoint = environ.get("HF_ENDPOINT", DEFAULT_HUB).rstrip("/")
    status: dict = {"offline_mode": is_offline(environ), "endpoint": endpoint, "reachable": None}
    if status["offline_mode"]:
        status["detail"] = "not checked: HF_HUB_OFFLINE is set"
        return status
    status["reachable"], status["detail"] = check_hub(endpoint, timeout_s)
    return status


def collect_environment(environ: Mapping[str, str] = os.environ, hub_timeout_s: float = 2.0) -> dict:
    """Everything `accel-dp env` reports, as plain data."""
    from . import __version__

    return {
        "accel-dp": f"{__version__} ({Path(__file__).resolve().parent})",
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "packages": package_versions(),
        "devices": devices(),
        "distributed_backends": distributed_backends(),
        "accelerate_config": summarize_accelerate_config(accelerate_default_config_path(environ)),
        "hub": hub_status(environ, hub_timeout_s),
        "variables": {name: environ[name] for name in RELEVANT_VARIABLES if name in environ},
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_environment(info: dict) -> str:
    """The facts as a Markdown list, to paste into an issue."""
    lines = ["### accel-dp environment", ""]
    lines.append(f"- accel-dp: {info['accel-dp']}")
    lines.append(f"- python: {info['python']}")
    lines.append(f"- platform: {info['platform']}")
    lines += [f"- {name}: {version}" for name, version in info["packages"].items()]

    dev = info["devices"]
    if dev["cuda_devices"]:
        names = ", ".join(f"{i}: {name}" for i, name in enumerate(dev["cuda_devices"]))
        lines.append(
            f"- GPUs: {len(dev['cuda_devices'])} CUDA ({names}); torch built for CUDA {dev['torch_cuda_version']}"
        )
    else:
        build = (
            f"torch built for CUDA {dev['torch_cuda_version']}" if dev["torch_cuda_version"] else "CPU build of torch"
        )
        lines.append(f"- GPUs: none visible ({build})")
    if dev["mps_available"]:
        lines.append("- Apple MPS: available")
    lines.append(f"- CPU cores: {dev['cpu_count']}")
    lines.append(
        "- distributed backends: " + ", ".join(f"{k} {_yes(v)}" for k, v in info["distributed_backends"].items())
    )

    config = info["accelerate_config"]
    if not config["exists"]:
        lines.append(f"- accelerate default config: none ({config['path']} does not exist)")
    elif "error" in config:
        lines.append(f"- accelerate default config: {config['path']} (unreadable: {config['error']})")
    else:
        settings = ", ".join(f"{k}={v}" for k, v in config["settings"].items()) or "no topology settings"
        sections = f"; sections: {', '.join(config['sections'])}" if config["sections"] else ""
        lines.append(f"- accelerate default config: {config['path']} ({settings}{sections})")

    hub = info["hub"]
    lines.append(f"- Hugging Face offline mode: {'on' if hub['offline_mode'] else 'off'}")
    if hub["reachable"] is None:
        lines.append(f"- Hugging Face Hub ({hub['endpoint']}): {hub['detail']}")
    else:
        state = "reachable" if hub["reachable"] else "NOT reachable"
        lines.append(f"- Hugging Face Hub ({hub['endpoint']}): {state} ({hub['detail']})")
    if info["variables"]:
        lines.append("- environment: " + ", ".join(f"{k}={v}" for k, v in info["variables"].items()))
    return "\n".join(lines) + "\n"
