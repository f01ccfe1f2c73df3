"""Golden bytes: one fixed message of each kind, encoded, compared with checked-in files.

A failure here means the bytes on the wire changed. If that is intended, bump
``PROTOCOL_VERSION`` (minor for an added optional field, major for anything else) and regenerate:

    .venv/bin/python -m tests.test_wire_golden --regen

Each file ``tests/golden/wire/<kind>.msgpack`` is a msgpack array of the message's frames (bin).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgpack
import pytest
import torch

from sft_actors.codec.spec import CodecPolicy
from sft_actors.model.config import LoraConfig
from sft_actors.wire import (
    Ack,
    Activations,
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    BasisUpload,
    Bye,
    DataPlan,
    DevicePlan,
    Error,
    EvalRequest,
    EvalResult,
    EvalStats,
    Gradients,
    Heartbeat,
    Hello,
    Message,
    Metrics,
    ModelPlan,
    MsgKind,
    Restore,
    RoundClose,
    RoundDone,
    RoundStart,
    RoundStats,
    ServedDevice,
    ServerPlan,
    Shutdown,
    StateReport,
    StateRequest,
    TrainPlan,
    Welcome,
    WireLimits,
    WireTensor,
    decode,
    encode,
)

GOLDEN_DIR = Path(__file__).parent / "golden" / "wire"
CODEC = CodecPolicy.parse(
    {
        "up": {"sparsify": {"keep": 0.1}, "quantize": {"bits": 8, "scale": "token"}, "lossless": {}},
        "down": {"quantize": {"bits": 6, "scale": "channel"}},
    }
)
MODEL = ModelPlan(model="smollm2-135m", dtype="float32", lora=LoraConfig(rank=8, alpha=16.0), seed=1)
SENDER = "dev0"
MSG_ID = 42
REPLY_TO = 7


def _t(tensor: torch.Tensor) -> WireTensor:
    return WireTensor.from_torch(tensor)


def sample_messages() -> dict[MsgKind, Message]:
    """One deterministic message per kind.

    Tensor values are small dyadic rationals, exact in every dtype used, so the bytes do not
    depend on how a CPU's vectorised kernels round.
    """
    acts = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 8 - 1  # (B, T, C)
    labels = torch.tensor([[1, 2, -100], [3, 4, 5]], dtype=torch.int64)  # (B, T)
    lora_a = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 4 - 1  # (r, d_in)
    lora_b = (torch.arange(8, dtype=torch.float32).reshape(4, 2) / 2 - 2).to(torch.bfloat16)  # (d_out, r)
    samples: list[Message] = [
        Hello(node="dev0", role="device", schema_hash="ab" * 32, capabilities=["topk", "quant8", "zstd"]),
        Welcome(node="server", schema_hash="ab" * 32, heartbeat_interval_s=0.5, credits=4),
        Activations(
            device="dev0",
            round=3,
            step=17,
            cut=4,
            activations=_t(acts.to(torch.bfloat16)),
            labels=_t(labels),
            n_samples=2,
            sent_at_ns=1_700_000_000_123_456_789,
            attention_mask=_t(torch.tensor([[True, True, False], [True, True, True]])),
        ),
        Gradients(
            device="dev0",
            round=3,
            step=17,
            grad=WireTensor.coded(
                {"chain": ["topk", "zstd"], "k": 3}, b"\x00\x01\x02\x03", dtype="float32", shape=(2, 3, 4)
            ),
            loss=2.25,
            n_tokens=5,
            correct=0,
            server_ms=1.5,
        ),
        AdaptersUp(
            device="dev0",
            round=3,
            n_samples=128,
            tensors={"blocks.0.attn.q.lora_a": _t(lora_a), "blocks.0.attn.q.lora_b": _t(lora_b)},
        ),
        AdaptersDown(
            round=3,
            tensors={"blocks.0.attn.q.lora_a": _t(lora_a * 2), "scalar": _t(torch.tensor(0.5))},
            reset_moments=["blocks.0.attn.q.lora_a"],
        ),
        Heartbeat(node="dev0", seq=9, sent_at_ns=123_456_789),
        Metrics(node="dev0", round=3, step_loss=2.5, wire_bytes=1024, raw_bytes=16384),
        Error(code="CodecError", message="NaN in activations", detail={"module": "sft_actors.errors"}),
        Shutdown(reason="training finished"),
        Bye(node="dev0", reason="shutdown"),
        DevicePlan(
            device="dev0",
            index=0,
            num_devices=2,
            mode="sft",
            server="server",
            cut=4,
            shard=0,
            model=MODEL,
            data=DataPlan(
                dataset="stdlib-docs",
                root=None,
                partition="dirichlet",
                alpha=0.5,
                heldout_fraction=0.1,
                options={"max_documents": 200},
                batch_size=4,
                seq_len=64,
                eval_batches=4,
                seed=1,
            ),
            train=TrainPlan(
                rounds=5,
                steps_per_round=8,
                lr=0.001,
                max_inflight=2,
                aggregate_every=1,
                calibration_batches=8,
                round_timeout_s=60.0,
            ),
            codec=CODEC,
        ),
        RoundStart(round=3),
        RoundDone(
            device="dev0",
            round=3,
            n_samples=256,
            loss=1.75,
            stats=RoundStats(
                bytes_up=1000,
                bytes_down=900,
                raw_up=16384,
                raw_down=16384,
                encode_ms=2.5,
                round_s=1.25,
                step_ms_median=40.0,
                targets=4096,
                basis_bytes=2336,
                basis_refits=1,
            ),
        ),
        EvalRequest(round=3, through_codec=False),
        EvalResult(
            node="dev0",
            round=3,
            stats=EvalStats(task="classification", loss_sum=12.5, targets=100, correct=25, batches=2),
        ),
        Ack(of_msg_id=41, credits=1),
        AdaptersRequest(round=3),
        BasisUpload(
            device="dev0",
            key="pca",
            digest="ab" * 16,
            kind="klt",
            vectors=_t(lora_a.T.contiguous().to(torch.float16)),  # (C, K) float16
            mean=_t(lora_a[0]),  # (C,) float32
            scales=_t(lora_a[1, :2] + 2),  # (K,)
            clip=_t(lora_a[1, :2] + 4),  # (K,)
        ),
        ServerPlan(
            server="server",
            mode="sft",
            model=MODEL,
            start_block=2,
            end_block=None,
            next_stage="",
            upstream=[],
            update="per_round",
            lr=0.001,
            inflight=16,
            round_timeout_s=60.0,
            devices=[ServedDevice(name="dev0", index=0, cut=4, codec=CODEC)],
            batch_size=8,
            seq_len=128,
        ),
        RoundClose(round=3, n_samples=256, micro_batches=64, devices=("dev0", "dev2")),
        StateRequest(round=3),
        StateReport(
            actor="dev0",
            round=3,
            tensors={"lora.blocks.0.q.lora_A": _t(lora_a)},
            counters={"step": 12, "samples_since_aggregation": 48},
        ),
        Restore(round=3, tensors={"lora.blocks.0.q.lora_A": _t(lora_a)}, counters={"step": 12}),
    ]
    return {msg.KIND: msg for msg in samples}


def golden_path(kind: MsgKind) -> Path:
    return GOLDEN_DIR / f"{kind.name.lower()}.msgpack"


def encode_sample(msg: Message) -> bytes:
    frames = encode(msg, sender=SENDER, msg_id=MSG_ID, reply_to=REPLY_TO)
    packed: bytes = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
    return packed


def regenerate() -> list[Path]:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, msg in sample_messages().items():
        path = golden_path(kind)
        path.write_bytes(encode_sample(msg))
        written.append(path)
    return written


def test_every_kind_has_a_sample() -> None:
    assert set(sample_messages()) == set(MsgKind)


@pytest.mark.parametrize("kind", list(MsgKind), ids=lambda k: k.name)
def test_encoding_matches_golden_bytes(kind: MsgKind) -> None:
    path = golden_path(kind)
    assert path.exists(), f"{path} is missing; run: python -m tests.test_wire_golden --regen"
    assert encode_sample(sample_messages()[kind]) == path.read_bytes(), (
        f"the wire encoding of {kind.name} changed. If intended, bump PROTOCOL_VERSION and run: "
        "python -m tests.test_wire_golden --regen"
    )


@pytest.mark.parametrize("kind", list(MsgKind), ids=lambda k: k.name)
def test_golden_bytes_decode_to_the_sample(kind: MsgKind) -> None:
    frames = msgpack.unpackb(golden_path(kind).read_bytes(), raw=False)
    env = decode(frames, WireLimits())
    assert (env.kind, env.sender, env.msg_id, env.reply_to) == (kind, SENDER, MSG_ID, REPLY_TO)
    assert env.msg == sample_messages()[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description="Golden wire bytes (tests/golden/wire).")
    parser.add_argument("--regen", action="store_true", help="rewrite every golden file from the samples")
    args = parser.parse_args()
    if not args.regen:
        parser.error("nothing to do; pass --regen to rewrite the golden files")
    for path in regenerate():
        print(path)


if __name__ == "__main__":
    main()
