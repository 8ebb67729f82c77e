"""`accel-dp env`: versions, devices, backends, accelerate's default config and Hub access, as pastable text."""

from __future__ import annotations

import http.server
import os
import platform
import threading
import time

import accelerate
import pytest
import torch
import transformers
from conftest import free_port
from typer.testing import CliRunner

import accel_dp
from accel_dp.cli import app
from accel_dp.env import accelerate_default_config_path, collect_environment, format_environment, hub_status

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def test_collected_facts_are_those_of_this_python_and_machine():
    info = collect_environment(environ=OFFLINE)
    assert info["packages"]["torch"] == torch.__version__
    assert info["packages"]["accelerate"] == accelerate.__version__
    assert info["packages"]["transformers"] == transformers.__version__
    assert info["accel-dp"].startswith(accel_dp.__version__)
    assert info["python"].startswith(platform.python_version())
    assert info["devices"]["cpu_count"] == os.cpu_count()
    assert len(info["devices"]["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["distributed_backends"] == {
        "gloo": torch.distributed.is_gloo_available(),
        "nccl": torch.distributed.is_nccl_available(),
        "mpi": torch.distributed.is_mpi_available(),
    }


def test_default_config_path_follows_accelerates_rule(tmp_path):
    from accelerate.commands.config.config_args import default_yaml_config_file

    assert accelerate_default_config_path() == accelerate_default_config_path(os.environ)
    assert str(accelerate_default_config_path(os.environ)) == default_yaml_config_file
    assert accelerate_default_config_path({"HF_HOME": str(tmp_path)}) == tmp_path / "accelerate" / "default_config.yaml"
    assert accelerate_default_config_path({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "huggingface" / "accelerate" / "default_config.yaml"
    )


def test_an_accelerate_default_config_is_summarised(tmp_path):
    config = tmp_path / "accelerate" / "default_config.yaml"
    config.parent.mkdir()
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 8\n"
        "mixed_precision: bf16\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
    )
    text = format_environment(collect_environment(environ={"HF_HOME": str(tmp_path), **OFFLINE}))
    assert (
        f"- accelerate default config: {config} (compute_environment=LOCAL_MACHINE, distributed_type=FSDP, "
        "num_machines=1, num_processes=8, mixed_precision=bf16; sections: fsdp_config)"
    ) in text
    config.write_text("distributed_type: [unclosed")
    assert "(unreadable: " in format_environment(collect_environment(environ={"HF_HOME": str(tmp_path), **OFFLINE}))
    missing = format_environment(collect_environment(environ={"HF_HOME": str(tmp_path / "none"), **OFFLINE}))
    assert "- accelerate default config: none (" in missing


@pytest.fixture
def local_hub():
    """A tiny HTTP server standing in for the Hub; it records the requests it gets."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_hub_is_checked_only_outside_offline_mode(local_hub, monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    endpoint, requests = local_hub

    offline = hub_status({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"})
    assert offline["reachable"] is None and requests == []
    assert "Hub (" + endpoint + "): not checked: HF_HUB_OFFLINE is set" in format_environment(
        collect_environment(environ={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"})
    )

    online = hub_status({"HF_ENDPOINT": endpoint + "/", "HF_HUB_OFFLINE": "0"})
    assert online == {"offline_mode": False, "endpoint": endpoint, "reachable": True, "detail": "HTTP 200"}
    assert requests == ["/"]

    started = time.monotonic()
    closed = hub_status({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, timeout_s=2.0)
    assert closed["reachable"] is False and time.monotonic() - started < 3


def test_env_command_prints_plain_text_with_the_versions():
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    for name, version in (("torch", torch.__version__), ("accelerate", accelerate.__version__),
                          ("transformers", transformers.__version__), ("accel-dp", accel_dp.__version__)):  # fmt: skip
        assert f"- {name}: {version}" in result.output
    assert f"- python: {platform.python_version()}" in result.output
    assert "- distributed backends: gloo " in result.output
    assert "not checked: HF_HUB_OFFLINE is set" in result.output  # the tests run offline: no network
    assert "\x1b[" not in result.output
