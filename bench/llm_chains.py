"""Which codec chain costs the least language-model quality per byte, on real activations.

Runs a pretrained model split at ``--cut`` on held-out text (the stdlib docstrings), sends the
cut activations through each chain (encode → decode) and reports the held-out perplexity the
server then computes, beside the compression ratio. Untrained adapters (B = 0), so this is the
codec's cost before any fine-tuning adapts to it.

    python bench/llm_chains.py                       # SmolLM2-135M, cut 4, 16 × 64 tokens
    python bench/llm_chains.py --model llama-tiny --sequences 4 --seq 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header

from sft_actors import log
from sft_actors.codec import BasisRegistry, ChainSpec, Codec, fit_basis, presets
from sft_actors.data import load_text_corpus
from sft_actors.model import LoraConfig, load_model, resolve_spec, split_model

_BITMAP = {"positions": "bitmap", "zstd_level": 3}
CHAINS: dict[str, dict[str, Any] | None] = {
    "raw": None,
    "topk0.2-b8": {
        "sparsify": {"keep": 0.2, "scope": "tensor"},
        "quantize": {"bits": 8, "scale": "token"},
        "lossless": _BITMAP,
    },
    "topk0.2-b8+first16": {
        "outliers": {"first_tokens": 1},
        "sparsify": {"keep": 0.2, "scope": "tensor"},
        "quantize": {"bits": 8, "scale": "token"},
        "lossless": _BITMAP,
    },
    "topk0.2-rownorm-b8+first16": {
        "outliers": {"first_tokens": 1},
        "sparsify": {"keep": 0.2, "scope": "tensor", "score": "row_normalized"},
        "quantize": {"bits": 8, "scale": "token"},
        "lossless": _BITMAP,
    },
    "topk0.3-rownorm-b4+first16": {
        "outliers": {"first_tokens": 1},
        "sparsify": {"keep": 0.3, "scope": "tensor", "score": "row_normalized"},
        "quantize": {"bits": 4, "scale": "token"},
        "lossless": _BITMAP,
    },
    "dense-b4+first16": {
        "outliers": {"first_tokens": 1},
        "quantize": {"bits": 4, "scale": "token"},
        "lossless": {"zstd_level": 3},
    },
    # Transform coding: PCA basis fitted on training-split activations (sent once per run).
    "pca-common0.5-ans+first16": {
        "outliers": {"first_tokens": 1},
        "project": {"basis": "pca"},
        "quantize": {"scale": "common", "step": 0.5},
        "lossless": {"entropy": "ans"},
    },
    "pca-common0.7-ans+first16": {
        "outliers": {"first_tokens": 1},
        "project": {"basis": "pca"},
        "quantize": {"scale": "common", "step": 0.7},
        "lossless": {"entropy": "ans"},
    },
    "pca-b4/component+first16": {
        "outliers": {"first_tokens": 1},
        "project": {"basis": "pca"},
        "quantize": {"bits": 4, "scale": "channel"},
        "lossless": {"zstd_level": 3},
    },
    "dense-b6+first16": {
        "outliers": {"first_tokens": 1},
        "quantize": {"bits": 6, "scale": "token"},
        "lossless": {"zstd_level": 3},
    },
    # The default family: rate-controlled transform coding (sft_actors.codec.presets), per up ratio.
    **{f"transform-{r:g}x": presets.transform_tables(r)["up"] for r in (8.0, 12.0, 16.0, 20.0, 24.0, 32.0)},
    "klt-12x": presets.transform_tables(12.0, transform="klt")["up"],
    "klt-16x": presets.transform_tables(16.0, transform="klt")["up"],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cut", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calibration", type=int, default=32, help="training sequences to fit the PCA basis")
    p.add_argument("--max-documents", type=int, default=0, help="cap the corpus (0: all)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    log.configure("console", level="warning")
    print(header("llm_chains", model=a.model, cut=a.cut, seq=a.seq, sequences=a.sequences))
    model = load_model(resolve_spec(a.model))
    tok = model.tokenizer
    opts = {"max_documents": a.max_documents} if a.max_documents else {}
    test = load_text_corpus("stdlib-docs", None, "test", heldout_fraction=0.1, seed=0, **opts)
    eos = tok.eos_id if tok.eos_id is not None else tok.pad_id
    packed = test.pack(tok.encode, eos_id=eos, seq_len=a.seq, pad_id=tok.pad_id)
    n = min(a.sequences, len(packed))
    batch = packed.collate(np.arange(n))
    ids, labels = batch["input_ids"], batch["labels"]
    device, server = split_model(model, a.cut, lora=LoraConfig(rank=8))
    rows: dict[str, dict[str, float]] = {}
    train = load_text_corpus("stdlib-docs", None, "train", heldout_fraction=0.1, seed=0, **opts)
    calibration = train.pack(tok.encode, eos_id=eos, seq_len=a.seq, pad_id=tok.pad_id)
    with torch.no_grad():
        calib_ids = calibration.collate(np.arange(min(a.calibration, len(calibration))))["input_ids"]
        calib = torch.cat([device(calib_ids[i : i + a.batch]) for i in range(0, len(calib_ids), a.batch)])
        chunks = [(ids[i : i + a.batch], labels[i : i + a.batch]) for i in range(0, n, a.batch)]
        hidden = [device(x) for x, _ in chunks]
        for name, table in CHAINS.items():
            spec = None if table is None else ChainSpec.parse(table)
            bases = BasisRegistry()
            if spec is not None and spec.project is not None:
                # Each transform chain fits its own basis (kind, skipped first tokens), as a device does.
                bases.register(spec.project.basis, fit_basis(spec, calib))
            codec = None if spec is None else Codec(spec, bases=bases)
            losses, ratios = [], []
            for i, (h, (_, y)) in enumerate(zip(hidden, chunks, strict=True)):
                if codec is not None:
                    enc = codec.encode(h, seed=i)
                    ratios.append(enc.report.ratio)
                    h = Codec.decode(enc.meta, enc.payload, bases=bases)
                losses.append(float(server.loss(server(h, a.cut), y)))
            ppl = math.exp(sum(losses) / len(losses))
            rows[name] = {"ratio": sum(ratios) / len(ratios) if ratios else 1.0, "perplexity": ppl}
    raw = rows["raw"]["perplexity"]
    print(f"{'chain':30} {'ratio':>7} {'ppl':>9} {'vs raw':>8}")
    for name, r in rows.items():
        print(f"{name:30} {r['ratio']:7.1f} {r['perplexity']:9.2f} {r['perplexity'] / raw - 1:+8.1%}")
    out = {"model": a.model, "cut": a.cut, "chains": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
