"""A Hugging Face Llama-family checkpoint checked against its config from the safetensors headers.

``sft topology check`` (through :func:`~sft_actors.model.spec.load_config`) and the loader call
:func:`check_hf_checkpoint` before any weight is read: the index's shards exist, each shard holds
exactly what the index places there, every tensor the config implies is present with its shape,
and nothing else is. Only each file's header is read (8-byte little-endian length + JSON), so the
check costs milliseconds however large the weights. Every error names the file and the Hugging
Face tensor name.

Tied embeddings follow transformers 5 (``PreTrainedModel.tie_weights`` during
``from_pretrained``): with ``tie_word_embeddings`` a stored ``lm_head.weight`` is allowed; if it
differs from the embedding transformers does not tie them (it logs "both are present in the
checkpoints with different values, so we will NOT tie them") — :func:`untie_if_stored_head_differs`
does the same, with a warning naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import torch

from sft_actors.errors import ModelSpecError
from sft_actors.log import get_logger
from sft_actors.model.config import LlamaConfig

log = get_logger(component="model.hf_checkpoint")

#: A Hugging Face Llama-family block's module names -> ours.
HF_LLAMA_BLOCK = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
}
HF_LLAMA_NAMES = {ours: theirs for theirs, ours in HF_LLAMA_BLOCK.items()}

SHARD_INDEX = "model.safetensors.index.json"
_HEADER_LIMIT = 100_000_000  # safetensors' own cap on the JSON header
_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer older transformers saved; recomputed, never read


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from a ``.safetensors`` file's header, without reading the data."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelSpecError(f"{path} is not a safetensors file (under 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT:
                raise ModelSpecError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{path} is not a safetensors file (bad JSON header: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelSpecError(f"{path} is not a safetensors file (header is not an object)")
    out: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise ModelSpecError(f"{path}: tensor {name!r} has no shape in the header")
        out[name] = tuple(int(d) for d in info["shape"])
    return out


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read and, for a sharded checkpoint, its index's ``weight_map``."""
    index_path = directory / SHARD_INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"cannot read {index_path}: {exc}") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSpecError(f"{index_path} has no 'weight_map' object naming the shards")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelSpecError(
                f"{index_path} names shard(s) {missing} that are not in {directory}; copy them there"
            )
        return files, weight_map
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelSpecError(f"no *.safetensors file in {directory}; put the weights there")
    return files, None


def stored_shapes(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """``{HF tensor name: (file, shape)}`` over the checkpoint, consistent with its index."""
    files, weight_map = checkpoint_files(directory)
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        for name, shape in read_header(f).items():
            if weight_map is not None and weight_map.get(name) != f.name:
                raise ModelSpecError(
                    f"{f} holds tensor {name!r} that {directory / SHARD_INDEX} does not place there"
                )
            if name in out:
                raise ModelSpecError(f"tensor {name!r} is stored twice: in {out[name][0]} and {f}")
            out[name] = (f, shape)
    if weight_map is not None and (absent := sorted(set(weight_map) - set(out))):
        raise ModelSpecError(
            f"{directory / SHARD_INDEX} places tensor(s) {absent[:5]} in shards that do not hold them"
        )
    return out


def block_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{our block tensor name: shape}`` of one :class:`~sft_actors.model.llama.LlamaBlock`
    (arithmetic on the config: building even a meta-device model costs seconds on first use)."""
    out: dict[str, tuple[int, ...]] = {"attn_norm.weight": (c.dim,), "mlp_norm.weight": (c.dim,)}
    linears = {
        "q": (c.q_dim, c.dim, c.qkv_bias),
        "k": (c.kv_dim, c.dim, c.qkv_bias),
        "v": (c.kv_dim, c.dim, c.qkv_bias),
        "o": (c.dim, c.q_dim, c.o_bias),
        "gate": (c.ffn_dim, c.dim, c.mlp_bias),
        "up": (c.ffn_dim, c.dim, c.mlp_bias),
        "down": (c.dim, c.ffn_dim, c.mlp_bias),
    }
    for name, (fan_out, fan_in, bias) in linears.items():
        out[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            out[f"{name}.bias"] = (fan_out,)
    if c.qk_norm:
        out["q_norm.weight"] = out["k_norm.weight"] = (c.head_dim,)
    return out


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{HF tensor name: shape}`` the config implies (``lm_head.weight`` only when untied)."""
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, config.dim),
        "model.norm.weight": (config.dim,),
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = (config.vocab_size, config.dim)
    for i in range(config.num_blocks):
        for ours, shape in block_shapes(config).items():
            module, kind = ours.split(".")
            out[f"model.layers.{i}.{HF_LLAMA_NAMES[module]}.{kind}"] = shape
    return out


def check_hf_checkpoint(directory: Path, config: LlamaConfig) -> None:
    """Refuse a checkpoint that does not fit ``config`` (see the module doc), reading headers only."""
    stored = stored_shapes(directory)
    want = expected_shapes(config)
    files, weight_map = checkpoint_files(directory)
    where = directory / SHARD_INDEX if weight_map is not None else files[0] if len(files) == 1 else directory
    if config.tie_embeddings and "lm_head.weight" in stored:
        want["lm_head.weight"] = want["model.embed_tokens.weight"]  # allowed; tied or not at load
        if "model.embed_tokens.weight" not in stored:
            want.pop("model.embed_tokens.weight")  # transformers ties the embedding to the stored head
    missing = sorted(set(want) - set(stored))
    if missing:
        raise ModelSpecError(
            f"{where}: the checkpoint lacks tensor(s) {missing[:5]}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            + f" that {directory / 'config.json'} implies"
        )
    for name, (path, shape) in sorted(stored.items()):
        if name.endswith(_IGNORED_SUFFIX):
            continue
        if name not in want:
            raise ModelSpecError(
                f"{path}: unexpected tensor {name!r} for a {config.arch} checkpoint with this config "
                f"(it may belong to a variant this loader does not support)"
            )
        if shape != want[name]:
            raise ModelSpecError(
                f"{path}: tensor {name!r} has shape {shape}, {directory / 'config.json'} implies {want[name]}"
            )


def resolve_tying(
    directory: Path, config: LlamaConfig, state: dict[str, torch.Tensor] | None = None
) -> LlamaConfig:
    """transformers 5's tying on load: with ``tie_word_embeddings``, a stored ``lm_head.weight``
    that differs from the embedding is kept (the config comes back untied, with a warning naming
    the file); an equal one stays tied. ``state`` (HF names, loaded) is edited to match; without
    it only these two tensors are read, and only when both are stored."""
    stored = stored_shapes(directory) if state is None else {}
    if not config.tie_embeddings or "lm_head.weight" not in (state if state is not None else stored):
        return config
    if state is None:
        if "model.embed_tokens.weight" not in stored:
            return config
        from safetensors import safe_open

        pair = {}
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            with safe_open(str(stored[name][0]), framework="pt") as f:
                pair[name] = f.get_tensor(name)
        head, embed = pair["lm_head.weight"], pair.get("model.embed_tokens.weight")
    else:
        head, embed = state["lm_head.weight"], state.get("model.embed_tokens.weight")
    if embed is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
        log.warning(
            "tied_head_differs_untied",
            file=str(directory / "config.json"),
            detail="tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
            "like transformers 5, the stored head is used and they are NOT tied (set "
            "tie_word_embeddings: false to silence this)",
        )
        return dataclasses.replace(config, tie_embeddings=False)
    if state is not None:
        if embed is None:  # transformers swaps source and target: the embedding is the stored head
            state["model.embed_tokens.weight"] = head
        del state["lm_head.weight"]
    return config
