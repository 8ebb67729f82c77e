"""Every run reports its throughput, achieved TFLOP/s from a documented FLOP count, MFU where the device's peak
is known (never on CPU), and peak memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import gpt_args, load_recipe, read_metrics
from transformers import AutoConfig


def test_mfu_uses_the_peak_of_the_device_and_precision_and_is_absent_where_unknown(monkeypatch):
    import run_kit as module

    gpu = SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="bf16")
    for name, expected in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                           ("NVIDIA A100-SXM4-80GB", 312.0), ("Some New GPU", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert module.peak_tflops(gpu) == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert module.peak_tflops(SimpleNamespace(device=gpu.device, mixed_precision="no")) == 19.5  # fp32 peak
    assert module.peak_tflops(SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")) is None


def test_gpt_run_reports_tflops_from_6n_plus_attention_and_no_mfu_on_cpu(tmp_path, token_cache):
    out = tmp_path / "run"
    results = load_recipe("gpt_pretrain").main(gpt_args(out, token_cache, "--sample_tokens", "0"))
    config = AutoConfig.from_pretrained(out)
    model_parameters = results["num_parameters"] - config.n_positions * config.n_embd  # all but position embeddings
    assert results["flops_per_token"] == 6 * model_parameters + 12 * config.n_layer * config.n_embd * 32
    assert results["tflops"] == pytest.approx(results["tokens_per_second"] * results["flops_per_token"] / 1e12)
    assert results["mfu"] is None and results["peak_tflops_per_device"] is None  # CPU: no peak to compare with
    assert 0.05 < results["peak_memory_gib"] < 24  # this process's peak RSS
    assert results["train_runtime_s"] > 0 and results["eval_runtime_s"] > 0  # evaluation is not training time
    logged = [r for r in read_metrics(out) if "tokens_per_second" in r]
    assert all(r["tflops"] == pytest.approx(r["tokens_per_second"] * results["flops_per_token"] / 1e12) for r in logged)
