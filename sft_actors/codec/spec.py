"""Chain specification: which stages run, with which parameters.

A chain is a fixed-order pipeline of optional stages::

    outliers -> project -> sparsify -> quantize | cast -> lossless

Any subset composes; the empty chain is the identity (raw bytes, bit-exact). A spec comes from a
TOML table (``ChainSpec.parse``) or from a peer's metadata (``ChainSpec.from_dict``); both reject
unknown keys and out-of-range values with :class:`ConfigError`, so a typo never silently turns
compression off.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeVar, cast, get_args

from sft_actors.codec.refit import RefitSpec
from sft_actors.errors import ConfigError

Scope = Literal["tensor", "token", "tokens", "channels"]
ThresholdMethod = Literal["sample", "exact"]
Score = Literal["magnitude", "row_normalized"]
ScaleMode = Literal["token", "channel", "common", "component"]
Rounding = Literal["stochastic", "nearest"]
Transform = Literal["klt", "center"]
Contexts = Literal["single", "column_scale"]
CastDtype = Literal["float16", "bfloat16"]
Positions = Literal["bitmap", "channel_bitmap", "delta"]
EntropyCoder = Literal["none", "ans"]

SUPPORTED_BITS: Final[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
STAGE_ORDER: Final[tuple[str, ...]] = ("outliers", "project", "sparsify", "quantize", "cast", "lossless")


@dataclass(kw_only=True, frozen=True, slots=True)
class OutlierSpec:
    """Send "massive activations" densely in 16 bit so they do not blow up the scales of the rest.

    ``first_tokens`` rows at the start of every sequence (attention sinks) always; channels whose
    sampled absolute maximum exceeds ``channel_factor`` x the median channel maximum (at most
    ``max_channels``); single elements above ``element_factor`` x the median token maximum (at
    most ``max_elements_fraction`` of the elements), e.g. massive values of spike tokens.

    ``bits=16``: rows and channels go as float16. ``bits=8``: massive single elements are pulled
    out (float16 with positions) and the rest of the rows/channels is quantized to 8 bits with one
    step per row/channel (unbiased stochastic rounding): half the bytes, cosine ~1 on those rows.
    """

    first_tokens: int = 1
    bits: int = 16
    max_channels: int = 8
    channel_factor: float = 8.0
    element_factor: float = 8.0
    max_elements_fraction: float = 0.001


@dataclass(kw_only=True, frozen=True, slots=True)
class ProjectSpec:
    """Transform coding: project tokens onto a basis fitted from calibration activations.

    ``basis`` is the key under which the caller registered the basis in a ``BasisRegistry`` on
    both sides; ``rank`` keeps the leading components (``None``: all of the basis).
    ``transform="klt"``: the PCA (Karhunen-Loève) eigenvectors of the calibration covariance,
    sent once as float16 (C·C·2 bytes); ``"center"``: no rotation, only the calibration mean
    and per-channel statistics are sent (C·12 bytes). On SmolLM2's cut activations with
    per-column entropy contexts the KLT has ≈ 7 % less error at equal frame bytes, at 100×
    the one-time bytes (BENCHMARKS.md "Compression").
    """

    basis: str
    rank: int | None = None
    transform: Transform = "klt"


@dataclass(kw_only=True, frozen=True, slots=True)
class SparsifySpec:
    """Top-K by magnitude. ``keep`` is the kept fraction κ of the elements (or rows/channels).

    ``score="row_normalized"`` (``scope="tensor"`` only) ranks elements by |x| / ‖row‖ instead of
    |x|: one global threshold on the *relative* size, so every token keeps its own largest values
    in proportion to how peaked it is, instead of loud tokens taking the budget of quiet ones.
    That maximises the mean per-token cosine (what a layer's input sees) at the same κ.
    """

    keep: float
    scope: Scope = "tensor"
    score: Score = "magnitude"
    method: ThresholdMethod = "sample"
    sample_size: int = 65536


@dataclass(kw_only=True, frozen=True, slots=True)
class QuantizeSpec:
    """Uniform scalar quantization.

    ``scale="token"|"channel"``: ``bits`` per value (sign + magnitude), one step per row/column.
    ``scale="common"``: one uniform step for the whole tensor — ``step`` times the RMS of the
    values, or chosen per frame by **rate control** so the whole frame is ``ratio`` times smaller
    than its raw bytes (±3 %); codes are unbounded integers meant for an entropy coder.
    ``scale="component"`` (needs ``project``): fixed rate, ``ratio`` sets the average bits per
    value; bits are allocated per component from the basis's calibration variances (reverse
    water-filling, greedy) and each component is clipped at its calibrated range.
    ``rounding="stochastic"``: unbiased (E[decode] = value; what gradients need);
    ``"nearest"``: half the mean squared error at the same step, biased (for activations).
    """

    bits: int | None = None
    scale: ScaleMode = "token"
    step: float | None = None
    ratio: float | None = None
    rounding: Rounding = "stochastic"

    def __post_init__(self) -> None:
        if self.bits is None and self.scale not in ("common", "component"):
            object.__setattr__(self, "bits", 8)  # the documented default for token/channel scales


@dataclass(kw_only=True, frozen=True, slots=True)
class CastSpec:
    """Round values to a 16-bit float type (a biased baseline; use ``quantize`` for unbiased)."""

    dtype: CastDtype = "float16"


@dataclass(kw_only=True, frozen=True, slots=True)
class LosslessSpec:
    """Entropy stage. ``zstd_level`` 0 disables zstd; ``entropy="ans"`` codes integer codes with
    rANS (``constriction``) at their empirical entropy. ``contexts="column_scale"`` (ANS only):
    columns (channels or components) are grouped by their scale in the frame, one histogram per
    group, instead of one histogram for all codes (≈ 8 % fewer bytes on transform codes).
    """

    positions: Positions = "bitmap"
    zstd_level: int = 3
    entropy: EntropyCoder = "none"
    contexts: Contexts = "single"


_StageT = TypeVar("_StageT")
_STAGE_TYPES: Final[dict[str, type[Any]]] = {
    "outliers": OutlierSpec,
    "project": ProjectSpec,
    "sparsify": SparsifySpec,
    "quantize": QuantizeSpec,
    "cast": CastSpec,
    "lossless": LosslessSpec,
}
_LITERALS: Final[dict[tuple[str, str], tuple[Any, ...]]] = {
    ("sparsify", "scope"): get_args(Scope),
    ("sparsify", "method"): get_args(ThresholdMethod),
    ("sparsify", "score"): get_args(Score),
    ("quantize", "scale"): get_args(ScaleMode),
    ("quantize", "rounding"): get_args(Rounding),
    ("project", "transform"): get_args(Transform),
    ("lossless", "contexts"): get_args(Contexts),
    ("cast", "dtype"): get_args(CastDtype),
    ("lossless", "positions"): get_args(Positions),
    ("lossless", "entropy"): get_args(EntropyCoder),
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(stage: str, key: str, value: Any, annotation: str) -> Any:
    """Values arrive from TOML or msgpack: accept exactly the JSON-like types the field allows."""
    where = f"codec.{stage}.{key}"
    allows_none = "None" in annotation
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{where} must be set")
    if "int" in annotation and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    allowed = _LITERALS.get((stage, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(
            f"{where} = {value!r} is not one of {list(allowed)}{_suggest(value, list(allowed))}"
        )
    return value


def _build_stage(stage: str, cls: type[_StageT], table: Any) -> _StageT:
    if not isinstance(table, Mapping):
        raise ConfigError(f"codec.{stage} must be a table of parameters, got {table!r}")
    known = {f.name: str(f.type) for f in fields(cast(Any, cls))}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if not isinstance(key, str) or key not in known:
            raise ConfigError(
                f"unknown key codec.{stage}.{key}{_suggest(str(key), list(known))}; known: {sorted(known)}"
            )
        kwargs[key] = _check_type(stage, key, value, known[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"codec.{stage}: {exc}") from exc


@dataclass(kw_only=True, frozen=True, slots=True)
class ChainSpec:
    """The stages of one codec chain; ``None`` means the stage is off."""

    outliers: OutlierSpec | None = None
    project: ProjectSpec | None = None
    sparsify: SparsifySpec | None = None
    quantize: QuantizeSpec | None = None
    cast: CastSpec | None = None
    lossless: LosslessSpec | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def identity(cls) -> ChainSpec:
        """Raw bytes in the input dtype: bit-exact round trip."""
        return cls()

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, name) is None for name in STAGE_ORDER if name != "lossless")

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> ChainSpec:
        """Build from a TOML table such as ``{"sparsify": {"keep": 0.1}, "quantize": {"bits": 8}}``."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"a codec chain must be a table of stages, got {table!r}")
        stages: dict[str, Any] = {}
        for name, params in table.items():
            stage_type = _STAGE_TYPES.get(name) if isinstance(name, str) else None
            if stage_type is None:
                raise ConfigError(
                    f"unknown codec stage {name!r}{_suggest(str(name), list(STAGE_ORDER))}; "
                    f"stages are {list(STAGE_ORDER)}"
                )
            stages[name] = _build_stage(name, stage_type, params)
        return cls(**stages)

    from_dict = parse

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack/TOML-able) that :meth:`from_dict` turns back into an equal spec."""
        out: dict[str, Any] = {}
        for name in STAGE_ORDER:
            stage = getattr(self, name)
            if stage is not None:
                out[name] = {f.name: getattr(stage, f.name) for f in fields(stage)}
        return out


def _validate(spec: ChainSpec) -> None:
    """Cross-field checks; every message says what to change."""
    o = spec.outliers
    if o is not None:
        if not 0 <= o.first_tokens <= 1024:
            raise ConfigError(f"codec.outliers.first_tokens must be in [0, 1024], got {o.first_tokens}")
        if not 0 <= o.max_channels <= 4096:
            raise ConfigError(f"codec.outliers.max_channels must be in [0, 4096], got {o.max_channels}")
        if not 0.0 <= o.max_elements_fraction <= 0.1:
            raise ConfigError("codec.outliers.max_elements_fraction must be in [0, 0.1]")
        if o.bits not in (8, 16):
            raise ConfigError(f"codec.outliers.bits must be 8 or 16, got {o.bits}")
        if o.channel_factor <= 1.0 or o.element_factor <= 1.0:
            raise ConfigError("codec.outliers.channel_factor and element_factor must be > 1")
    p = spec.project
    if p is not None:
        if not p.basis:
            raise ConfigError("codec.project.basis must name a registered basis")
        if p.rank is not None and p.transform == "center":
            raise ConfigError(
                "codec.project.rank needs transform = 'klt' (a 'center' basis keeps every channel)"
            )
        if p.rank is not None and p.rank < 1:
            raise ConfigError(f"codec.project.rank must be >= 1 (or unset for full rank), got {p.rank}")
    s = spec.sparsify
    if s is not None:
        if not 0.0 < s.keep <= 1.0:
            raise ConfigError(f"codec.sparsify.keep must be in (0, 1], got {s.keep}")
        if not 256 <= s.sample_size <= 1 << 24:
            raise ConfigError(f"codec.sparsify.sample_size must be in [256, 2^24], got {s.sample_size}")
        if s.score == "row_normalized" and s.scope != "tensor":
            raise ConfigError("codec.sparsify.score = 'row_normalized' needs scope = 'tensor'")
    q = spec.quantize
    if q is not None:
        if spec.cast is not None:
            raise ConfigError("codec.quantize and codec.cast exclude each other: keep one")
        _validate_quantize(q, spec)
    lo = spec.lossless
    if lo is not None and not 0 <= lo.zstd_level <= 22:
        raise ConfigError(f"codec.lossless.zstd_level must be in [0, 22], got {lo.zstd_level}")
    if lo is not None and lo.contexts != "single" and lo.entropy != "ans":
        raise ConfigError("codec.lossless.contexts needs entropy = 'ans' (zstd has no contexts)")


#: Rate control's range of target ratios (raw bytes ÷ coded bytes of a frame).
MIN_RATIO, MAX_RATIO = 2.0, 1000.0


def _validate_quantize(q: QuantizeSpec, spec: ChainSpec) -> None:
    if q.ratio is not None and spec.sparsify is not None:
        raise ConfigError("codec.quantize.ratio (rate control) codes dense frames: remove the sparsify stage")
    if q.ratio is not None and not MIN_RATIO <= q.ratio <= MAX_RATIO:
        raise ConfigError(f"codec.quantize.ratio must be in [{MIN_RATIO:g}, {MAX_RATIO:g}], got {q.ratio}")
    if q.scale == "common":
        if q.bits is not None:
            raise ConfigError("codec.quantize.bits must be unset with scale = 'common' (set step or ratio)")
        if (q.step is None) == (q.ratio is None):
            raise ConfigError(
                "codec.quantize with scale = 'common' needs exactly one of step (times the RMS, fixed "
                "quality) or ratio (rate control: raw bytes / coded bytes per frame)"
            )
        if q.step is not None and not 0.0 < q.step <= 10.0:
            raise ConfigError("codec.quantize.step must be in (0, 10] (times the RMS) with scale = 'common'")
        if q.ratio is not None and (spec.lossless is None or spec.lossless.entropy != "ans"):
            raise ConfigError(  # whole-byte codes could not reach the ratio
                'codec.quantize.ratio (rate control) needs lossless = { entropy = "ans" }'
            )
        return
    if q.scale == "component":
        if spec.project is None:
            raise ConfigError("codec.quantize.scale = 'component' needs a project stage (its components)")
        if q.bits is not None or q.step is not None or q.ratio is None:
            raise ConfigError(
                "codec.quantize.scale = 'component' takes ratio (fixed rate) only: unset bits and step"
            )
        return
    if q.bits not in SUPPORTED_BITS:
        raise ConfigError(f"codec.quantize.bits must be one of {list(SUPPORTED_BITS)}, got {q.bits}")
    if q.step is not None or q.ratio is not None:
        raise ConfigError("codec.quantize.step and ratio are only used with scale = 'common' or 'component'")


@dataclass(kw_only=True, frozen=True, slots=True)
class CodecPolicy:
    """The chain per role: activations travel ``up`` (device → server), gradients ``down``.

    Parsed once from a topology's ``[run.codec]`` (or a device's ``codec``) table and passed on
    typed: the coordinator's plan carries it to the device and the server. Raises
    :class:`ConfigError` for a ``project`` stage on the gradient chain (transform coding needs
    calibration activations to fit its basis; gradients have none). ``refit``: when a device
    refits the basis of a projecting up chain as its activations drift (``[run.codec.refit]``).
    """

    up: ChainSpec = field(default_factory=ChainSpec.identity)
    down: ChainSpec = field(default_factory=ChainSpec.identity)
    refit: RefitSpec = field(default_factory=RefitSpec)

    def __post_init__(self) -> None:
        if self.down.project is not None:
            raise ConfigError(
                "codec.down has a project stage; transform coding is for activations (codec.up) only: "
                "remove 'project' from the gradient chain"
            )

    @classmethod
    def identity(cls) -> CodecPolicy:
        """Raw tensors both ways (what ``sl``, ``sfl`` and ``fedlora`` send)."""
        return cls()

    @property
    def is_identity(self) -> bool:
        return self.up.is_identity and self.down.is_identity

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> CodecPolicy:
        """From a TOML table ``{up = {...}, down = {...}, refit = {...}}``; a missing role is the
        identity, a missing ``refit`` the default :class:`RefitSpec`."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"a codec policy must be a table with 'up' and 'down', got {table!r}")
        unknown = set(table) - {"up", "down", "refit"}
        if unknown:
            raise ConfigError(
                f"unknown codec policy keys {sorted(unknown)}: use 'up' and 'down' (and 'refit')"
            )
        try:
            up = ChainSpec.parse(table.get("up", {}))
        except ConfigError as exc:
            raise ConfigError(f"up: {exc}") from None
        try:
            down = ChainSpec.parse(table.get("down", {}))
        except ConfigError as exc:
            raise ConfigError(f"down: {exc}") from None
        return cls(up=up, down=down, refit=RefitSpec.parse(table.get("refit", {})))

    def to_dict(self) -> dict[str, Any]:
        """The TOML/msgpack table :meth:`parse` reads back into an equal policy."""
        return {"up": self.up.to_dict(), "down": self.down.to_dict(), "refit": self.refit.to_dict()}
