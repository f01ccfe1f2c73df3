"""Checks that need more than the topology file: the model's config, the dataset's files, the
installed codec packages, what the runtime can train, and (``sft topology check`` only) DNS.

:func:`check_environment` runs inside :func:`~sft_actors.topology.load_topology`, so ``sft
run``, ``sft-node`` and ``sft topology check`` refuse such a file at load, not minutes into a
run. Each failure is one :class:`~sft_actors.errors.TopologyError` line naming the file, the
table, the key and the fix. :func:`topology_warnings` lists what a valid file sets but the
run will ignore.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection

from sft_actors.codec.spec import CodecPolicy
from sft_actors.errors import ConfigError, DatasetCorrupt, DatasetNotFound, ModelSpecError
from sft_actors.model.config import LLAMA_ATTENTION, LlamaConfig, ModelConfig
from sft_actors.topology.codec_checks import check_codec_shapes, codec_warnings
from sft_actors.topology.data_checks import check_instructions
from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import AUTO_ADDRESS, CODED_MODES, ROLES, Topology
from sft_actors.topology.validate import exposed_hosts, is_loopback

#: ``model_config(spec) -> config | None``: the architecture a ``[run] model`` names (None: unknown,
#: skip the checks that need it). The default reads the config only (no weights, ~0.1 s).
ModelConfigHint = Callable[[str], ModelConfig | None]


def default_model_config(r: Reporter) -> ModelConfigHint:
    """The model layer's own reading of a spec, every refusal as one ``[run] model`` line.

    A Hugging Face Llama directory must also hold its ``*.safetensors`` (the weights are only
    read when the run starts, so their absence would otherwise surface minutes later).
    """

    def resolve(spec: str) -> ModelConfig:
        from safetensors import SafetensorError

        from sft_actors.model.spec import load_config, resolve_spec  # torch: only when a file is read

        fix = "fix the file or point model at a supported checkpoint"
        try:
            resolved = resolve_spec(spec)
            config = load_config(resolved)
        except (ModelSpecError, ConfigError, OSError) as exc:
            r.fail("[run]", "model", f"cannot use model {spec!r}: {exc}")
        except KeyError as exc:  # the loaders index config.json fields directly
            r.fail("[run]", "model", f"cannot use model {spec!r}: its config lacks {exc}; add that field")
        except (ValueError, TypeError, SafetensorError) as exc:  # a mistyped field, a corrupt header
            r.fail("[run]", "model", f"cannot use model {spec!r}: it does not parse ({exc}); {fix}")
        weights = resolved.path
        if resolved.source == "hf_llama" and weights is not None and not any(weights.glob("*.safetensors")):
            r.fail("[run]", "model", f"no *.safetensors file in {weights}; put the weights there")
        return config

    return resolve


def check_environment(
    r: Reporter, topo: Topology, config: ModelConfig | None, roles: Collection[str] = ROLES
) -> list[str]:
    """Everything the run needs beyond the file, for the actors of ``roles`` run here; returns
    what the data checks warn of (:attr:`Topology.data_warnings`).

    ``config`` is the model's architecture (None: unknown, its checks are skipped). The
    dataset's files are needed only where devices run, the codec's packages where devices or
    servers run: an edge host running only the coordinator and the server needs no data.
    """
    check_dtype(r, topo)
    check_model(r, topo, config)
    check_codec_shapes(r, topo, config)
    if {"device", "server"} & set(roles):
        check_codec_packages(r, topo)
    return check_data(r, topo, config, present="device" in roles)


def check_dtype(r: Reporter, topo: Topology) -> None:
    """Refuse float16 *training*: base weights in float16 overflow activations (max 65504) and
    underflow cut gradients, and this runtime has no loss scaling (``torch.amp.GradScaler``)
    to keep them in range across the cut. bfloat16 (float32's range) trains in every mode with
    float32 adapters and optimizer state; float16 models still load for evaluation/export."""
    if topo.run.dtype == "float16":
        r.fail(
            "[run]",
            "dtype",
            "float16 training is not supported: without loss scaling (which this runtime does not "
            "implement) float16 activations overflow (max 65504) and cut gradients underflow to "
            'zero; use dtype = "bfloat16" (the same memory and wire bytes, float32\'s range) or '
            '"float32"; float16 weights still load for inference '
            "(sft_actors.model.load_model(spec, dtype=torch.float16))",
        )


def check_model(r: Reporter, topo: Topology, config: ModelConfig | None) -> None:
    """``seq_len`` fits a Llama's context (image models ignore it) and the LoRA targets select
    at least one projection of the model's family."""
    if config is None:
        return
    t = topo.run.train
    if isinstance(config, LlamaConfig):
        if t.seq_len < 2:
            r.fail("[run.train]", "seq_len", f"must be at least 2 for next-token prediction, got {t.seq_len}")
        if t.seq_len > config.max_seq_len:
            r.fail(
                "[run.train]",
                "seq_len",
                f"{t.seq_len} tokens exceed the context of model {topo.run.model!r} "
                f"({config.max_seq_len} tokens); use seq_len <= {config.max_seq_len}",
            )
    try:
        topo.run.lora.projections(config.family)
    except ConfigError as exc:
        r.fail("[run.lora]", "targets", f"{exc}; use some of {list(LLAMA_ATTENTION)}")


def check_codec_packages(r: Reporter, topo: Topology) -> None:
    """An ``entropy = "ans"`` stage needs the ``constriction`` package (a dependency; checked for
    installs made without it; coded modes only)."""
    from sft_actors.codec.entropy import require_ans

    if topo.run.train.mode not in CODED_MODES:
        return
    tables = [("[run]", topo.run.codec)] + [
        (f"[[actors]] {d.name!r}", d.codec) for d in topo.devices if d.codec is not None
    ]
    for where, policy in tables:
        for role, chain in (("up", policy.up), ("down", policy.down)):
            if chain.lossless is not None and chain.lossless.entropy == "ans":
                try:
                    require_ans()
                except ConfigError as exc:
                    r.fail(where, f"codec.{role}", str(exc))


def check_data(r: Reporter, topo: Topology, config: ModelConfig | None, *, present: bool = True) -> list[str]:
    """The dataset is one the data layer knows, of the model's kind (text for a Llama, images
    for a ViT), with a tokenizer for text, its options exist and, with ``present``, its files are
    where the run reads them and load: a user's text files are read and every record checked
    here (invalid UTF-8, JSON or CSV, a missing field: file:line), not minutes into a run.
    Returns warnings (instruction conversations dropped at ``seq_len``)."""
    from sft_actors.data.registry import check_dataset, dataset_kind  # torch: only when a file is read

    d = topo.run.data
    try:
        kind = dataset_kind(d.dataset)
    except ConfigError as exc:
        r.fail("[run.data]", "dataset", f"{exc}; use one of those names")
    if config is not None:
        wanted = "text" if config.family == "llama" else "image"
        if kind != wanted:
            example = "stdlib-docs, text:<path> or jsonl:<path>" if wanted == "text" else "fashion-mnist"
            article = "an" if wanted == "image" else "a"
            r.fail(
                "[run.data]",
                "dataset",
                f"{d.dataset!r} holds {kind}s but model {topo.run.model!r} ({config.family}) trains on "
                f"{wanted}s; use {article} {wanted} dataset (e.g. {example}) or another model",
            )
    if d.kind == "instruction" and d.chat_template not in ("auto", "none"):
        from sft_actors.data.chat_template import load_template_file

        try:
            load_template_file(d.chat_template)
        except ConfigError as exc:
            r.fail("[run.data]", "chat_template", f'{exc}; or use "auto" or "none"')
    if not present:
        return []
    if kind == "text" and isinstance(config, LlamaConfig):  # devices tokenize; others need none
        check_tokenizer(r, topo.run.model, config)
    path_key = "dataset" if ":" in d.dataset else "root"
    try:
        check_dataset(d.dataset, d.root, contents=False)
    except DatasetNotFound as exc:
        r.fail("[run.data]", path_key, str(exc))
    except ConfigError as exc:
        r.fail("[run.data]", path_key, f"{exc}; fix the value")
    try:  # the files are there (above), so what fails now is an option or the files' contents
        loaded = check_dataset(d.dataset, d.root, **d.loader_options())
    except DatasetCorrupt as exc:
        r.fail("[run.data]", path_key, f"{exc}")
    except ConfigError as exc:
        r.fail("[run.data]", "options", f"{exc}; fix or remove that option")
    return check_instructions(r, topo, loaded)


def check_tokenizer(r: Reporter, model: str, config: LlamaConfig) -> None:
    """A Llama trained on text needs a tokenizer: a Hugging Face folder needs its
    ``tokenizer.json`` and a preset needs the byte vocabulary (256); GGUF files carry theirs."""
    from sft_actors.model.spec import resolve_spec

    try:
        spec = resolve_spec(model)
    except (ModelSpecError, ConfigError, OSError):  # reported by the model check, or a test's hint
        return
    if spec.source == "hf_llama" and spec.path is not None and not (spec.path / "tokenizer.json").is_file():
        r.fail(
            "[run]",
            "model",
            f"{spec.path} has no tokenizer.json, and the dataset is text; put tokenizer.json in {spec.path}",
        )
    if spec.source == "preset" and config.vocab_size != 256:
        r.fail(
            "[run]",
            "model",
            f"preset {model!r} has vocab_size {config.vocab_size} but no tokenizer (only vocab_size 256 "
            "has one, the byte tokenizer); use vocab_size=256, a GGUF file or a folder with tokenizer.json",
        )


def check_hosts(topo: Topology, hosts: Collection[str] | None = None) -> None:
    """Every host address in ``hosts`` (default: the hosts that have actors) resolves here.

    Not part of loading: an in-process ``sft run`` never dials host addresses, a lookup can
    block for seconds without DNS, and the answer depends on the machine asking. ``sft topology
    check`` calls it for every host; a node should call it for the hosts it binds or dials.
    Raises :class:`TopologyError` for the first address that does not resolve.
    """
    r = Reporter(topo.source)
    wanted = set(hosts) if hosts is not None else {a.host for a in topo.actors}
    for h in topo.hosts:
        if h.name not in wanted or h.address == AUTO_ADDRESS:
            continue
        try:
            socket.getaddrinfo(h.address, None)
        except (OSError, UnicodeError) as exc:  # gaierror is an OSError; a 64+ char label a UnicodeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            r.fail(
                f"[[hosts]] {h.name!r}",
                "address",
                f"{h.address!r} does not resolve on this machine ({reason}); "
                "use an IP address or a name DNS or /etc/hosts knows",
            )


def local_hosts(topo: Topology) -> set[str]:
    """Names of the topology's hosts that are this machine: a one-host topology's host, a
    loopback address, or this machine's host name."""
    if len(topo.hosts) == 1:
        return {topo.hosts[0].name}
    me = {socket.gethostname().lower(), socket.getfqdn().lower()}
    return {h.name for h in topo.hosts if is_loopback(h.address) or h.address.lower() in me}


def check_placement(
    topo: Topology, hosts: Collection[str] | None = None, *, actors: Collection[str] | None = None
) -> None:
    """Every actor placed on a CUDA device (``[[actors]] device``) on ``hosts`` (default:
    :func:`local_hosts`) finds that device here. Raises :class:`TopologyError` naming the
    actor, the device asked and what this machine has — what the actor would raise at start
    (:func:`~sft_actors.placement.resolve_device`). Imports torch only when a CUDA device is
    asked for. With ``actors`` (names), exactly those actors are checked, wherever placed:
    the ones ``sft run`` or ``sft-node`` is about to start here."""
    from sft_actors.placement import DeviceUnavailable, resolve_device

    r = Reporter(topo.source)
    here = local_hosts(topo) if hosts is None else set(hosts)
    for a in topo.actors:
        mine = a.name in actors if actors is not None else a.host in here
        if mine and a.device != "cpu":
            try:
                resolve_device(a.device, actor=a.name)
            except DeviceUnavailable as exc:
                r.fail(f"[[actors]] {a.name!r}", "device", str(exc))


def topology_warnings(topo: Topology) -> tuple[str, ...]:
    """What a valid file sets but the run ignores, one line each (a baseline reuses a file
    written for ``sft`` with another mode, so these are warnings, not errors)."""
    r = Reporter(topo.source)
    mode = topo.run.train.mode
    out: list[str] = []
    if mode not in CODED_MODES:
        raw = f'mode {mode!r} sends raw tensors and ignores it; remove it or use mode = "sft"'
        if topo.run.codec != CodecPolicy():
            out.append(r.message("[run.codec]", None, raw))
        for d in topo.devices:
            if d.codec is not None and d.codec != CodecPolicy():
                out.append(r.message(f"[[actors]] {d.name!r}", "codec", raw))
    if mode in ("sl", "fedlora") and topo.run.train.max_inflight > 1:
        why = {
            "sl": "is exact (vanilla) split learning, one micro-batch in flight",
            "fedlora": "trains whole models on the devices, one micro-batch at a time",
        }[mode]
        out.append(
            r.message("[run.train]", "max_inflight", f"mode {mode!r} {why}, and ignores it; remove it")
        )
    if mode == "sl" and topo.run.train.lora_averaging != "fedavg":
        why = "hands one adapter set from device to device and averages nothing, so it ignores it"
        out.append(r.message("[run.train]", "lora_averaging", f"mode 'sl' {why}; remove it"))
    if mode == "fedlora" and topo.servers:
        names = ", ".join(repr(s.name) for s in topo.servers)
        out.append(r.message("[[actors]]", "role", f"mode 'fedlora' uses no server; {names} will sit idle"))
    if mode in CODED_MODES:
        out.extend(codec_warnings(r, topo))
    out.extend(_security_warnings(r, topo))
    out.extend(topo.data_warnings)
    return tuple(out)


def _security_warnings(r: Reporter, topo: Topology) -> list[str]:
    """``allow_insecure`` in force: unauthenticated sockets on addresses other machines reach."""
    sec = topo.run.security
    exposed = exposed_hosts(topo)
    if sec.mode != "none" or not sec.allow_insecure or not exposed:
        return []
    where = ", ".join(f"{h.name!r} ({h.address})" for h in exposed)
    return [
        r.message(
            "[run.security]",
            "allow_insecure",
            f'mode "none" on {where}, not loopback: anyone who can reach the ports can join as any '
            f'actor; set mode = "curve" and run `sft keys generate {topo.source} --out {sec.keys}`',
        )
    ]
