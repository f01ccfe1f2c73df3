"""From a topology to the per-actor plans the coordinator sends (the only place that decides).

Every device gets a :class:`DevicePlan` and every server actor a :class:`ServerPlan`; the
actors build what they run from these alone. A mode that sends raw tensors (``sl``, ``sfl``,
``fedlora``) gets the identity codec here, once, instead of each actor branching on the mode.
"""

from __future__ import annotations

from sft_actors.codec.spec import CodecPolicy
from sft_actors.errors import TopologyError
from sft_actors.topology.schema import CODED_MODES, ActorSpec, Topology
from sft_actors.wire.messages import DevicePlan, ServerPlan
from sft_actors.wire.plans import DataPlan, ModelPlan, ServedDevice, TrainPlan


def model_plan(topo: Topology) -> ModelPlan:
    run = topo.run
    return ModelPlan(model=run.model, dtype=run.dtype, lora=run.lora, seed=run.seed)


def effective_codec(topo: Topology, device: str) -> CodecPolicy:
    """The chains ``device`` really uses: its own or ``[run.codec]`` in ``sft``, else the identity."""
    if topo.run.train.mode not in CODED_MODES:
        return CodecPolicy.identity()
    return topo.codec_policy(device)


def server_stages(topo: Topology) -> list[tuple[int, ActorSpec]]:
    """Server actors ordered by first block (the loader resolved every ``start_block``)."""
    return sorted(((s.start_block or 0, s) for s in topo.servers), key=lambda item: item[0])


def server_for(topo: Topology, cut: int) -> str:
    """The server stage that takes activations at ``cut``: the last one starting at or below it."""
    eligible = [s.name for start, s in server_stages(topo) if start <= cut]
    if not eligible:
        raise TopologyError(f"{topo.source}: no server starts at or below cut {cut}; lower a start_block")
    return eligible[-1]


def device_plans(topo: Topology) -> list[DevicePlan]:
    """One plan per device, in topology order."""
    run, t, d = topo.run, topo.run.train, topo.run.data
    data = DataPlan(
        dataset=d.dataset,
        root=d.root,
        partition=d.partition,
        alpha=d.alpha,
        heldout_fraction=d.heldout_fraction,
        options=d.loader_options(),
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        eval_batches=t.eval_batches,
        seed=run.seed,
    )
    train = TrainPlan(
        rounds=t.rounds,
        steps_per_round=t.steps_per_round,
        lr=t.lr,
        # sl is exact split learning and fedlora has no server to wait for: one at a time.
        max_inflight=1 if t.mode in ("sl", "fedlora") else t.max_inflight,
        aggregate_every=t.aggregate_every,
        calibration_batches=t.calibration_batches,
        round_timeout_s=t.round_timeout_s,
    )
    whole = t.mode == "fedlora"
    return [
        DevicePlan(
            device=dev.name,
            index=i,
            num_devices=len(topo.devices),
            mode=t.mode,
            server="" if whole else server_for(topo, dev.cut or 0),
            cut=dev.cut or 0,
            shard=dev.shard if dev.shard is not None else i,
            model=model_plan(topo),
            data=data,
            train=train,
            codec=effective_codec(topo, dev.name),
        )
        for i, dev in enumerate(topo.devices)
    ]


def server_plans(topo: Topology) -> list[ServerPlan]:
    """One plan per server actor: a head (runs to the loss) or a middle stage."""
    t = topo.run.train
    stages = server_stages(topo)
    served = [
        ServedDevice(name=dev.name, index=i, cut=dev.cut or 0, codec=effective_codec(topo, dev.name))
        for i, dev in enumerate(topo.devices)
    ]
    plans = []
    for k, (start, spec) in enumerate(stages):
        nxt = stages[k + 1] if k + 1 < len(stages) else None
        plans.append(
            ServerPlan(
                server=spec.name,
                mode=t.mode,
                model=model_plan(topo),
                start_block=start,
                end_block=None if nxt is None else nxt[0],
                next_stage="" if nxt is None else nxt[1].name,
                upstream=[s.name for _, s in stages[:k]],
                update=t.server_update,
                lr=t.lr,
                # A middle stage holds one micro-batch per request any device may have in flight.
                inflight=max(1, topo.run.runtime.link_window * len(topo.devices)),
                round_timeout_s=t.round_timeout_s,
                devices=served,
                batch_size=t.batch_size,
                seq_len=t.seq_len,
            )
        )
    return plans
