"""recipes/metering.py: the Meter (items/s, TFLOP/s and MFU, pauses left out, its state carried in checkpoints), the
FLOP count against a hand count, the peak table, and the memory estimate against a measured peak; then a whole run
reports all of them, and one that cannot fit is refused in seconds."""

from __future__ import annotations

from types import SimpleNamespace

import metering
import pytest
import torch
from conftest import gpt_args, load_recipe, read_metrics
from transformers import AutoConfig


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def step(loss: float, examples: int, items: int, flops: float, finite: bool = True):
    from training import Step

    return Step(torch.tensor(loss * examples), examples, items, flops, 1.0 if finite else float("nan"), finite)


def test_the_meter_reports_items_per_second_tflops_and_mfu_with_pauses_left_out(monkeypatch):
    from accelerate import Accelerator

    clock = Clock()
    monkeypatch.setattr(metering, "time", clock)
    meter = metering.Meter(Accelerator(cpu=True), "tokens", start_time=0.0)
    meter.peak = 10.0  # TFLOP/s: as if the device were in the peak table
    meter.add(step(2.0, examples=3, items=300, flops=3e12))
    meter.add(step(9.9, examples=3, items=300, flops=3e12, finite=False))  # skipped: trained nothing, counts time
    clock.now = 2.0
    with meter.paused("eval"):
        clock.now = 5.0
    clock.now = 6.0
    record = meter.record(step=2)
    assert record["step"] == 2 and record["loss"] == pytest.approx(2.0)  # the skipped step's loss is left out
    assert record["tokens_per_second"] == pytest.approx(600 / 3)  # 6 s, 3 of them evaluating
    assert record["tflops"] == pytest.approx(6e12 / 3 / 1e12) and record["mfu"] == pytest.approx(0.2)
    assert record["elapsed_s"] == 6.0
    meter.add(step(1.0, examples=1, items=100, flops=1e12))
    clock.now = 7.0
    summary = meter.summary()
    assert summary["train_runtime_s"] == pytest.approx(4.0) and summary["eval_runtime_s"] == pytest.approx(3.0)
    assert summary["tokens_per_second"] == pytest.approx(700 / 4) and summary["train_loss"] == pytest.approx(7 / 4)


def test_the_meters_unlogged_window_survives_a_checkpoint_also_on_another_number_of_processes(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(metering, "time", Clock())
    accelerator = Accelerator(cpu=True)
    meter = metering.Meter(accelerator, "tokens", start_time=0.0)
    meter.add(step(2.0, examples=2, items=200, flops=1e12))
    state = meter.state_dict()
    resumed = metering.Meter(accelerator, "tokens", start_time=0.0)
    resumed.load_state_dict(state)
    assert resumed.record(step=1)["loss"] == pytest.approx(2.0)
    # Written by 2 processes, resumed on 1: the main process takes both windows, so the next log step sums them.
    two = {**state, "windows": [[4.0, 2.0, 200.0, 1e12], [2.0, 2.0, 200.0, 1e12]]}
    resumed.load_state_dict(two)
    record = resumed.record(step=2)
    assert record["loss"] == pytest.approx(6.0 / 4) and record["tokens_per_second"] > 0


def test_flops_per_token_is_six_per_matmul_weight_plus_attention_by_hand():
    """GPT-2: per layer 12 d^2 + 13 d weights (attention 3d^2 + 3d and d^2 + d, MLP 4d^2 + 4d and 4d^2 + d, two
    LayerNorms 4d), the token embeddings (tied to the LM head's matmul), the last LayerNorm 2d; the position
    embeddings are a lookup. Attention adds 12 x layers x width x context (PaLM, appendix B)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, vocab, context = 2, 32, 65, 16
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab, n_positions=64))
    by_hand = layers * (12 * width**2 + 13 * width) + vocab * width + 2 * width
    flops = metering.FlopsPerToken.of(model)
    assert flops.weights == by_hand
    assert flops(context) == 6 * by_hand + 12 * layers * width * context


MEASURE_PEAK = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from types import SimpleNamespace
from metering import training_memory
from transformers import AutoModelForCausalLM, GPT2Config

torch.manual_seed(0)
batch, context, vocab = 4, 2048, 65
dropout = float(sys.argv[2])
config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=vocab, n_positions=context, attn_pdrop=dropout,
                    activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)  # gpt-pretrain's GELU
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # as gpt-pretrain makes it
optimizer = torch.optim.AdamW(model.parameters())
inputs = torch.randint(0, vocab, (batch, context))


def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets the peak (VmHWM) to now: what came before the step does not count
before = resident("VmRSS:")
loss = torch.nn.functional.cross_entropy(model(inputs).logits.flatten(0, 1), inputs.flatten())
loss.backward()
optimizer.step()
peak = resident("VmHWM:")
accelerator = SimpleNamespace(mixed_precision="no", num_processes=1, distributed_type=SimpleNamespace(name="NO"))
need = training_memory(accelerator, model, batch * context, context, dropout > 0, logits=batch * context * vocab)
weights = 4 * sum(p.numel() for p in model.parameters())
print(json.dumps({"measured": peak - before, "estimated": sum(need.values()) - weights}))
"""


@pytest.mark.parametrize("attention_dropout", ["0", "0.1"])
def test_the_memory_estimate_is_within_a_factor_of_two_of_the_measured_peak_on_cpu(tmp_path, attention_dropout):
    """One training step of a 4 x 128 GPT at 4 x 2048 tokens, in a process of its own (a clean peak RSS): what the
    step adds to the memory the model already held, against the estimate less the weights. With attention dropout,
    sdpa on CPU holds the whole attention matrix (batch x heads x context^2), and the estimate counts it."""
    import json
    import subprocess
    import sys

    from conftest import RECIPES_DIR, subprocess_env

    script = tmp_path / "peak.py"
    script.write_text(MEASURE_PEAK)
    command = [sys.executable, str(script), str(RECIPES_DIR), attention_dropout]
    result = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.5 < figures["estimated"] / figures["measured"] < 2, figures


def test_mfu_uses_the_peak_of_the_device_and_precision_and_is_absent_where_unknown(monkeypatch):
    module = metering

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


def test_a_run_that_cannot_fit_in_memory_is_refused_in_seconds(tmp_path, token_cache, capsys):
    """The issue's case: attention over 12 x 100,000 tokens would train on, silently, for minutes (here x 10 in
    batch, so that it cannot fit on any CI machine either)."""
    import time

    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(gpt_args(tmp_path / "out", token_cache, "--block_size", "100000",
                                                  "--per_device_train_batch_size", "120"))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and time.monotonic() - start < 30
    assert "this run needs about" in err and "lower --block_size, --per_device_train_batch_size" in err
    assert not (tmp_path / "out").exists()
