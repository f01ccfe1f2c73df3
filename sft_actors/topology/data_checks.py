"""Checks of instruction data that need the model's tokenizer and chat template: every
conversation renders, and enough of each fits ``[run.train] seq_len`` to train on.

The tokenizer is read without loading the model: a Hugging Face folder's ``tokenizer.json``,
the byte tokenizer of a preset, or a GGUF's once the model cache holds it (the first run fills
the cache; until then the run itself reports what these checks would).
"""

from __future__ import annotations

import json
from typing import Any

from sft_actors.errors import ConfigError, DatasetCorrupt, ModelSpecError
from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import Topology


def check_instructions(r: Reporter, topo: Topology, loaded: object) -> list[str]:
    """Fail when a conversation does not render with the run's chat template, or when no
    conversation keeps a response token within ``seq_len`` (the run would refuse the data at
    device setup); return a warning when some (not all) are dropped for that reason."""
    from sft_actors.data.chat_template import ChatRenderer, load_template_file
    from sft_actors.data.instruct import InstructionCorpus, renderer_for

    d = topo.run.data
    if not isinstance(loaded, InstructionCorpus):
        return []
    tok = model_tokenizer(topo.run.model)
    if d.chat_template == "none":
        template = None
    elif d.chat_template != "auto":
        template = load_template_file(d.chat_template)
    elif tok is not None:
        template = tok.chat_template
    else:
        return []  # the model's template is unknown until it is loaded
    key = "chat_template" if d.chat_template not in ("auto", "none") else "dataset"
    try:
        renderer = renderer_for(tok, template) if tok is not None else ChatRenderer(template)
        for conv in loaded.documents:
            renderer.segments(conv.messages, conv.source)
    except DatasetCorrupt as exc:
        r.fail("[run.data]", key, f"{exc}; fix the record or use another chat_template")
    except ConfigError as exc:
        r.fail("[run.data]", "chat_template", str(exc))
    if tok is None:
        return []
    return _check_fit(r, topo, loaded.documents, tok, renderer)


def _check_fit(r: Reporter, topo: Topology, conversations: Any, tok: Any, renderer: Any) -> list[str]:
    from sft_actors.data.instruct import encode_conversation, keeps_response

    seq_len = topo.run.train.seq_len
    eos = tok.eos_id if tok.eos_id is not None else tok.pad_id
    dropped = [
        c for c in conversations if not keeps_response(encode_conversation(c, tok, renderer, eos)[1], seq_len)
    ]
    if not dropped:
        return []
    total = len(conversations)
    first = dropped[0].source
    if len(dropped) == total:
        r.fail(
            "[run.train]",
            "seq_len",
            f"no conversation of {topo.run.data.dataset!r} keeps a response token within seq_len {seq_len} "
            f"(all {total} would be dropped, e.g. {first}); raise seq_len or shorten the prompts",
        )
    return [
        r.message(
            "[run.train]",
            "seq_len",
            f"{len(dropped)} of {total} conversations of {topo.run.data.dataset!r} have no response token "
            f"within seq_len {seq_len} and will be dropped (e.g. {first}); "
            "raise seq_len or shorten the prompts",
        )
    ]


def model_tokenizer(model: str) -> Any:
    """The model's tokenizer if it can be read without loading the model, else None."""
    from sft_actors.model import gguf_loader, hf_loader
    from sft_actors.model.spec import load_config, resolve_spec
    from sft_actors.model.tokenizer import BpeTokenizer, ByteTokenizer

    try:
        spec = resolve_spec(model)
        if spec.source == "hf_llama" and spec.path is not None:
            return hf_loader.hf_tokenizer(spec.path)
        if spec.source == "gguf" and spec.path is not None:
            entry = gguf_loader.cache_root() / "gguf" / gguf_loader.file_key(spec.path)
            meta_file, tok_file = entry / "meta.json", entry / "tokenizer.json"
            if meta_file.is_file() and tok_file.is_file():
                meta = json.loads(meta_file.read_text())
                if meta.get("format") == gguf_loader.CACHE_FORMAT:
                    return BpeTokenizer.from_json(tok_file.read_text(), **meta["special"])
            return None
        if spec.source == "preset" and getattr(load_config(spec), "vocab_size", None) == 256:
            return ByteTokenizer()
    except (
        ModelSpecError,
        ConfigError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ):  # the model check reports these
        return None
    return None
