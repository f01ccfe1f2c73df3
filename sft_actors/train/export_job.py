"""``sft export`` and ``sft generate`` as functions: load a run, assemble one device's model,
write it, check it against the runtime, or continue a prompt with it.

The self-check feeds a few seeded token ids (2 × 8) through the written model and through the
runtime's split parts with the same adapters, and reports the largest absolute logit
difference. It loads the written folder with ``transformers`` (and ``peft`` for
``--format peft``) when they are installed — the check a user's own code would make — and
otherwise with this package's loaders (``self_check`` in the result says which).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sft_actors.dtypes import torch_dtype
from sft_actors.errors import ConfigError, DatasetCorrupt
from sft_actors.model import LoraConfig, SplitLM, Tokenizer, export_hf_llama, load_model, resolve_spec
from sft_actors.train.run_adapters import DeviceModel, ExportError, RunAdapters, device_model, load_run
from sft_actors.train.run_export import (
    check_inputs,
    describe,
    generate,
    merged_model,
    peft_state_back,
    runtime_logits,
    write_merged,
    write_peft,
)

Format = Literal["peft", "merged"]
FORMATS: tuple[str, ...] = ("peft", "merged")
NO_HF_BASE = (
    "the run's base model ({model}) is not a folder or file transformers/timm can load, so "
    "adapter_config.json names no base: pass --with-base to write it into OUT/base, or use --format merged"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Loaded:
    run: RunAdapters
    model: SplitLM
    dm: DeviceModel
    hf_base: bool  # the run's model is a folder or file (HF Llama, timm/HF ViT weights)
    base_dir: Path | None = None  # the run's model as a Hugging Face Llama folder


def load_device(
    run_dir: Path, device: str, *, round_: int | str | None, topology: str | Path | None
) -> Loaded:
    """The run's adapters, its base model (as the run loaded it) and ``device``'s model.
    Raises :class:`ExportError` / ``ConfigError`` / ``CheckpointError``."""
    run = load_run(run_dir, round_=round_, topology=topology)
    spec = resolve_spec(run.info.model_spec)
    model = load_model(spec, dtype=torch_dtype(run.info.dtype))
    dm = device_model(run, device, model.num_blocks)
    return Loaded(
        run=run,
        model=model,
        dm=dm,
        hf_base=spec.source in ("hf_llama", "vit_weights"),
        base_dir=spec.path if spec.source == "hf_llama" else None,
    )


def _check_out(out: Path, force: bool) -> None:
    """Refuses an ``out`` that is a file, or a non-empty folder unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")


def _prepare_out(out: Path, force: bool) -> Path:
    """A fresh temporary folder beside ``out`` (checked again: the model took a while to load)."""
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))


def export_run(
    run_dir: Path,
    device: str,
    fmt: Format,
    out: Path,
    *,
    force: bool = False,
    round_: int | str | None = None,
    topology: str | Path | None = None,
    with_base: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Write ``device``'s model from ``run_dir`` to ``out`` in ``fmt``; returns the JSON line.

    ``out`` is written as a temporary folder and renamed into place (``force`` replaces an
    existing non-empty one). Raises :class:`ExportError` (unknown device, no adapters yet, a
    non-empty ``out``, a fedlora ViT), ``ConfigError`` for a model that cannot be loaded,
    ``CheckpointError`` for a corrupted checkpoint."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out).absolute()
    _check_out(out, force)
    loaded = load_device(run_dir, device, round_=round_, topology=topology)
    model, dm, info = loaded.model, loaded.dm, loaded.run.info
    if model.family == "vit" and info.whole_model_on_device:
        raise ExportError(
            "a fedlora ViT run does not save the heads its devices trained (only their LoRA "
            "average), so the model a device ended with cannot be rebuilt from RUN_DIR"
        )
    tmp = _prepare_out(out, force)
    note = None
    try:
        if fmt == "merged":
            write_merged(model, dm, info.lora, tmp, base=loaded.base_dir)
            base = None
        else:
            if loaded.hf_base:
                base = info.model_spec
            elif with_base:
                _write_base(model, tmp / "base")
                base = str(out / "base")
            else:
                base = ""
                note = NO_HF_BASE.format(model=info.model)
            write_peft(dm, info.lora, tmp, family=model.family, base=base)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    line: dict[str, Any] = {
        "ok": True,
        "run_dir": str(run_dir),
        "device": device,
        "format": fmt,
        "out": str(out),
        "files": sorted(p.name for p in out.iterdir()),
        **describe(dm, loaded.run),
    }
    if fmt == "peft":
        line["base_model_name_or_path"] = base
    elif model.family == "llama" and "tokenizer.json" not in line["files"]:
        line["tokenizer"] = (
            "none: the model has no tokenizer"
            if model.tokenizer is None
            else "none written: the model's byte tokenizer maps each UTF-8 byte to its id"
        )
    if note:
        line["note"] = note
    if check:
        diff, how = self_check(loaded, fmt, out, base or None)
        line["max_abs_logit_diff_vs_runtime"] = diff
        line["self_check"] = how
    return line


def _write_base(model: SplitLM, directory: Path) -> Path:
    """The base model alone: an HF Llama folder, or a ViT in timm's layout."""
    if model.family == "llama":
        return export_hf_llama(model, directory)
    write_merged(model, DeviceModel(device="base", cut=0, lora={}), LoraConfig(), directory)
    return directory


def self_check(loaded: Loaded, fmt: Format, out: Path, base: str | None) -> tuple[float, str]:
    """Largest |logit difference| between the written model and the runtime's parts, and how
    the written model was loaded (``transformers``, ``transformers+peft`` or ``sft_actors``;
    a ViT is always read back with this package's loaders: timm is not a dependency)."""
    model, dm = loaded.model, loaded.dm
    inputs = check_inputs(model)  # (2, 8) token ids, or (2, C, H, W) images
    reference = runtime_logits(model, loaded.run, dm, inputs)  # (2, 8, V) or (2, K)
    with tempfile.TemporaryDirectory() as scratch:
        if fmt == "peft" and not base and model.family == "llama":  # an HF base just for the check
            base = str(_write_base(model, Path(scratch) / "base"))
        got, how = _written_logits(loaded, fmt, out, base, inputs)
    return float((got.float() - reference.float()).abs().max()), how


@torch.no_grad()
def _written_logits(
    loaded: Loaded, fmt: Format, out: Path, base: str | None, inputs: torch.Tensor
) -> tuple[torch.Tensor, str]:
    dtype = next(loaded.model.parameters()).dtype
    if loaded.model.family == "llama":
        return _transformers_logits(loaded, fmt, out, base, inputs, dtype)
    return _own_logits(loaded, fmt, out, inputs, dtype), "sft_actors"


def _transformers_logits(
    loaded: Loaded, fmt: Format, out: Path, base: str | None, inputs: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, str]:
    try:
        transformers: Any = importlib.import_module("transformers")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if fmt == "merged":
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).to(dtype).eval()
            logits: torch.Tensor = hf(inputs).logits
            return logits, "transformers"
        peft: Any = importlib.import_module("peft")
        assert base is not None
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).to(dtype).eval()
        peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
        logits = peft_model(input_ids=inputs).logits
        return logits, "transformers+peft"
    except ImportError:
        return _own_logits(loaded, fmt, out, inputs, dtype), "sft_actors"


def _own_logits(
    loaded: Loaded, fmt: Format, out: Path, inputs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The written folder read back with this package's loaders."""
    if fmt == "merged":
        mine = load_model(resolve_spec(str(out)), dtype=dtype)
    else:
        dm = loaded.dm
        lora, head = peft_state_back(out, sorted(dm.lora), loaded.model.family)
        back = DeviceModel(device=dm.device, cut=dm.cut, lora=lora, head=head)
        mine = merged_model(loaded.model, back, loaded.run.info.lora)
    result: torch.Tensor = mine(inputs)
    return result


def generate_text(
    run_dir: Path,
    device: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    round_: int | str | None = None,
    topology: str | Path | None = None,
    chat: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``device``'s model (merged in memory) continuing ``prompt``: the text and a JSON-able
    description. With ``chat`` (runs on ``kind = "instruction"`` data) the prompt is one user
    turn rendered with the run's chat template and the prompt for the assistant's answer.
    Raises :class:`ExportError` for a ViT, a model without a tokenizer, or ``chat`` on a text run."""
    loaded = load_device(run_dir, device, round_=round_, topology=topology)
    model = loaded.model
    tok = model.tokenizer
    if model.family != "llama":
        raise ExportError(f"sft generate needs a language model; {loaded.run.info.model} is a ViT")
    if tok is None:
        raise ExportError(
            f"the run's model {loaded.run.info.model} has no tokenizer (an HF folder needs its "
            "tokenizer.json); generation needs one to encode --prompt"
        )
    info = loaded.run.info
    if chat and info.data_kind != "instruction":
        raise ExportError(
            f"--chat renders the prompt as the run's instruction data were rendered, but run "
            f"{info.run!r} trained on kind = {info.data_kind!r} data; drop --chat"
        )
    ids = chat_prompt_ids(tok, prompt, info.chat_template) if chat else prompt_ids(tok, prompt)
    merged = merged_model(model, loaded.dm, loaded.run.info.lora)
    new = generate(merged, ids, max_new_tokens, temperature=temperature, seed=seed, eos_id=tok.eos_id)
    text = tok.decode([i for i in new if i != tok.eos_id])
    return text, {
        "device": device,
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        **describe(loaded.dm, loaded.run),
    }


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """``prompt``'s token ids as the run's training saw text: each document tokenized without a
    BOS (:meth:`~sft_actors.data.text.TextCorpus.pack` joins documents with EOS only), so a
    generation prompt starts as a training document did."""
    return tok.encode(prompt)


def chat_prompt_ids(tok: Tokenizer, prompt: str, chat_template: str) -> list[int]:
    """``prompt`` as a user turn with the prompt for the assistant's answer, rendered with the
    run's ``chat_template`` setting (the plain format for "none" or a model without one) and
    tokenized as the run's instruction data were."""
    from sft_actors.data.instruct import generation_prompt_ids, renderer_for, resolve_chat_template

    try:
        renderer = renderer_for(tok, resolve_chat_template(chat_template, tok))
        return generation_prompt_ids((("user", prompt),), tok, renderer, "--prompt")
    except (ConfigError, DatasetCorrupt) as exc:
        raise ExportError(f"--chat: {exc}") from exc
