"""`accel-dp sample`: generate text with a model that gpt-pretrain saved, through transformers.

The model and tokenizer load with `from_pretrained` from the run's --output_dir. Generation may run past the
model's context (its --block_size): when the window is full, it continues from the newest half of it, as
nanoGPT's sampler crops its context.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_gpt_run(run_dir: Path) -> None:
    """A one-line UsageError unless run_dir holds a saved causal language model and its tokenizer."""
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} does not exist: give the --output_dir of a gpt-pretrain run")
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UsageError(
            f"{run_dir} has no config.json: not a saved model (a finished gpt-pretrain run's --output_dir has "
            "config.json, model.safetensors and tokenizer.json; checkpoints/ folders are for resuming)"
        )
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        raise UsageError(f"{config_file} is not a JSON model config: is {run_dir} a gpt-pretrain output?") from None
    if not any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
        kind = ", ".join(architectures) or "no architecture"
        raise UsageError(f"{run_dir} holds {kind}, not a text generator: give a gpt-pretrain run's --output_dir")
    if not any((run_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise UsageError(f"{run_dir} has no tokenizer files: a gpt-pretrain run saves its tokenizer beside the model")


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature must be 0 (always the likeliest token) or more, got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be 0 (no limit) or more, got {top_k}")


def load_gpt_run(run_dir: Path):
    """(model, tokenizer) of a gpt-pretrain output folder, in eval mode, on the GPU if there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gpt_run(run_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        model = AutoModelForCausalLM.from_pretrained(run_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"{run_dir} does not load with transformers: {str(err).splitlines()[0]}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 200,
    seed: int | None = None,
) -> tuple[str, str]:
    """(prompt as the tokenizer sees it, generated continuation). temperature 0 picks the likeliest token each
    time; top_k 0 samples from the whole vocabulary. Stops early at the end-of-text token, if the model has one."""
    import torch

    check_sampling_options(max_new_tokens, temperature, top_k)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    if ids.shape[1] == 0:
        raise UsageError(f"the prompt {prompt!r} has no token in this model's vocabulary: use characters it knows")
    if seed is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    options = {"do_sample": temperature > 0, "pad_token_id": eos if eos is not None else 0}
    if temperature > 0:
        options.update(temperature=temperature, top_k=top_k, top_p=1.0)
    window = context_length(model)
    generated, remaining = ids, max_new_tokens
    while remaining > 0:
        context = generated if generated.shape[1] < window else generated[:, -(window // 2) :]
        step = min(remaining, window - context.shape[1])
        with torch.no_grad():
            output = model.generate(
                input_ids=context, attention_mask=torch.ones_like(context), max_new_tokens=step, **options
            )
        new = output[:, context.shape[1] :]
        generated = torch.cat([generated, new], dim=1)
        remaining -= new.shape[1]
        if new.shape[1] < step or (eos is not None and new.shape[1] and new[0, -1].item() == eos):
            break
    seen_prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    continuation = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    return seen_prompt, continuation
