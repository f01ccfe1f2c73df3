"""Message bodies <-> msgpack maps, checked against the dataclass annotations.

Each message field's annotation is compiled once (at import, when the registry is built) into
a :class:`TypeCodec`: a decoder that checks an untrusted msgpack value against the annotation
and raises :class:`MalformedFrame` naming the field, and an encoder that lifts
:class:`WireTensor` values out of the body into separate buffers, leaving their buffer index.

Supported annotations: ``int``, ``float`` (an int is accepted and converted), ``str``, ``bool``,
``bytes``, ``None``, ``Any`` (any msgpack value), ``Literal[...]`` of str/int values,
``list[T]``, ``tuple[T, ...]`` (a list on the wire), ``dict[str, T]``, unions of those,
frozen dataclasses whose fields are all supported (a map on the wire: typed configs such as a
codec ``ChainSpec`` travel as themselves, and their own validation runs on decode),
``WireTensor`` and ``dict[str, WireTensor]`` (optionally ``| None``). Anything else is a
``TypeError`` at import, so a bad message definition never reaches the wire. Decoding recurses
only as deep as the annotation, never as deep as the (untrusted) value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sft_actors.errors import ConfigError, MalformedFrame, ProtocolError
from sft_actors.wire.tensors import WireTensor

_SCALARS: Final[tuple[type, ...]] = (int, float, str, bool, bytes, type(None))


@dataclass(slots=True)
class BufferTable:
    """Decoding side: the message's tensors by buffer index; each may be claimed once."""

    tensors: Sequence[WireTensor]
    used: set[int] = field(default_factory=set)

    def take(self, index: object, path: str) -> WireTensor:
        if type(index) is not int:
            raise MalformedFrame(f"{path}: expected a buffer index (int), got {type(index).__name__}")
        if not 0 <= index < len(self.tensors):
            raise MalformedFrame(
                f"{path}: buffer index {index} out of range (message has {len(self.tensors)})"
            )
        if index in self.used:
            raise MalformedFrame(f"{path}: buffer index {index} is used twice")
        self.used.add(index)
        return self.tensors[index]


@dataclass(slots=True)
class BufferSink:
    """Encoding side: tensors lifted out of the body, in the order they become frames."""

    tensors: list[WireTensor] = field(default_factory=list)

    def put(self, tensor: object, path: str) -> int:
        if not isinstance(tensor, WireTensor):
            raise ProtocolError(
                f"{path}: expected a WireTensor, got {type(tensor).__name__} (wrap tensors with "
                "WireTensor.from_torch or a codec)"
            )
        self.tensors.append(tensor)
        return len(self.tensors) - 1


Decoder = Callable[[object, str, BufferTable], Any]
Encoder = Callable[[Any, str, BufferSink], Any]


@dataclass(frozen=True, slots=True)
class TypeCodec:
    """Compiled checks for one annotation. ``encode`` is None when no tensor can hide inside."""

    decode: Decoder
    encode: Encoder | None
    label: str


def _fail(path: str, label: str, value: object) -> MalformedFrame:
    return MalformedFrame(f"{path}: expected {label}, got {type(value).__name__}")


def _scalar(tp: type) -> TypeCodec:
    label = "None" if tp is type(None) else tp.__name__
    if tp is float:

        def decode_float(value: object, path: str, _: BufferTable) -> Any:
            # A foreign encoder may write 2.0 as the int 2; bool is an int subclass, refuse it.
            if type(value) is float:
                return value
            if type(value) is int:
                return float(value)
            raise _fail(path, label, value)

        return TypeCodec(decode=decode_float, encode=None, label=label)

    def decode_exact(value: object, path: str, _: BufferTable) -> Any:
        if type(value) is not tp:  # exact: True is not an int here
            raise _fail(path, label, value)
        return value

    return TypeCodec(decode=decode_exact, encode=None, label=label)


def _any() -> TypeCodec:
    def decode_any(value: object, path: str, _: BufferTable) -> Any:
        return value  # already restricted to msgpack types by the unpacker

    return TypeCodec(decode=decode_any, encode=None, label="any value")


def _tensor() -> TypeCodec:
    def decode_tensor(value: object, path: str, table: BufferTable) -> Any:
        return table.take(value, path)

    def encode_tensor(value: Any, path: str, sink: BufferSink) -> Any:
        return sink.put(value, path)

    return TypeCodec(decode=decode_tensor, encode=encode_tensor, label="tensor")


def _list(elem: TypeCodec) -> TypeCodec:
    label = f"list[{elem.label}]"

    def decode_list(value: object, path: str, table: BufferTable) -> Any:
        if type(value) is not list:
            raise _fail(path, label, value)
        return [elem.decode(item, f"{path}[{i}]", table) for i, item in enumerate(value)]

    encode_list: Encoder | None = None
    if elem.encode is not None:
        elem_encode = elem.encode

        def encode_list(value: Any, path: str, sink: BufferSink) -> Any:
            return [elem_encode(item, f"{path}[{i}]", sink) for i, item in enumerate(value)]

    return TypeCodec(decode=decode_list, encode=encode_list, label=label)


def _dict(value_codec: TypeCodec) -> TypeCodec:
    label = f"dict[str, {value_codec.label}]"

    def decode_dict(value: object, path: str, table: BufferTable) -> Any:
        if type(value) is not dict:
            raise _fail(path, label, value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise MalformedFrame(f"{path}: map keys must be str, got {type(key).__name__}")
            out[key] = value_codec.decode(item, f"{path}[{key!r}]", table)
        return out

    encode_dict: Encoder | None = None
    if value_codec.encode is not None:
        item_encode = value_codec.encode

        def encode_dict(value: Any, path: str, sink: BufferSink) -> Any:
            return {key: item_encode(item, f"{path}[{key!r}]", sink) for key, item in value.items()}

    return TypeCodec(decode=decode_dict, encode=encode_dict, label=label)


def _union(arms: list[TypeCodec], allows_none: bool, exact: tuple[type, ...]) -> TypeCodec:
    labels = [arm.label for arm in arms] + (["None"] if allows_none else [])
    label = " | ".join(labels)
    with_tensors = [arm for arm in arms if arm.encode is not None]
    if with_tensors and len(arms) > 1:
        # A buffer index is an int: "tensor | int" could not be told apart on the wire.
        raise TypeError(f"a union may combine a tensor-bearing type only with None, got {label}")

    def decode_union(value: object, path: str, table: BufferTable) -> Any:
        if value is None:
            if allows_none:
                return None
            raise _fail(path, label, value)
        if type(value) in exact:
            return value
        for arm in arms:
            try:
                return arm.decode(value, path, table)
            except MalformedFrame:
                continue
        raise _fail(path, label, value)

    encode_union: Encoder | None = None
    if with_tensors:
        arm_encode = with_tensors[0].encode
        assert arm_encode is not None

        def encode_union(value: Any, path: str, sink: BufferSink) -> Any:
            return None if value is None else arm_encode(value, path, sink)

    return TypeCodec(decode=decode_union, encode=encode_union, label=label)


def _literal(values: tuple[Any, ...]) -> TypeCodec:
    if not values or not all(type(v) in (str, int) for v in values):
        raise TypeError(f"Literal values on the wire must be str or int, got {values!r}")
    label = " | ".join(repr(v) for v in values)

    def decode_literal(value: object, path: str, _: BufferTable) -> Any:
        for allowed in values:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise MalformedFrame(f"{path}: expected one of {label}, got {value!r}")

    return TypeCodec(decode=decode_literal, encode=None, label=label)


def _tuple(elem: TypeCodec) -> TypeCodec:
    inner = _list(elem)

    def decode_tuple(value: object, path: str, table: BufferTable) -> Any:
        return tuple(inner.decode(value, path, table))

    return TypeCodec(decode=decode_tuple, encode=inner.encode, label=f"tuple[{elem.label}, ...]")


def _struct(cls: type) -> TypeCodec:
    """A frozen dataclass as a map of its fields; decoding runs the class's own validation."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls!r} is not a frozen dataclass")
    specs = compile_fields(cls)
    label = cls.__name__

    def decode_struct(value: object, path: str, table: BufferTable) -> Any:
        if type(value) is not dict:
            raise _fail(path, label, value)
        kwargs = decode_fields(f"{path}<{label}>", value, specs, table)
        try:
            return cls(**kwargs)
        except (ConfigError, TypeError, ValueError) as exc:  # the type's own checks refused it
            raise MalformedFrame(f"{path}: invalid {label}: {exc}") from None

    def encode_struct(value: Any, path: str, sink: BufferSink) -> Any:
        if not isinstance(value, cls):
            raise ProtocolError(f"{path}: expected {label}, got {type(value).__name__}")
        return encode_body(value, specs, sink, path=path)

    return TypeCodec(decode=decode_struct, encode=encode_struct, label=label)


def compile_type(tp: Any) -> TypeCodec:
    """Compile a field annotation into its checks; ``TypeError`` if it cannot go on the wire."""
    if tp is Any:
        return _any()
    if tp is WireTensor:
        return _tensor()
    if tp in _SCALARS:
        return _scalar(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return _literal(args)
    if origin is list and len(args) == 1:
        return _list(compile_type(args[0]))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple(compile_type(args[0]))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _struct(tp)
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"map keys must be str on the wire, got {tp!r}")
        return _dict(compile_type(args[1]))
    if origin in (typing.Union, types.UnionType):
        none = type(None)
        arms = [a for a in args if a is not none]
        exact = tuple(a for a in arms if a in _SCALARS)
        return _union([compile_type(a) for a in arms], none in args, exact)
    raise TypeError(f"field type {tp!r} cannot go on the wire; use msgpack types or WireTensor")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    required: bool
    codec: TypeCodec


def compile_fields(cls: type) -> tuple[FieldSpec, ...]:
    """The compiled fields of a message dataclass, in declaration order (= body key order)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        try:
            codec = compile_type(hints[f.name])
        except TypeError as exc:
            raise TypeError(f"{cls.__name__}.{f.name}: {exc}") from exc
        specs.append(FieldSpec(name=f.name, required=required, codec=codec))
    return tuple(specs)


def encode_body(
    obj: object, specs: tuple[FieldSpec, ...], sink: BufferSink, *, path: str | None = None
) -> dict[str, Any]:
    """The msgpack-ready body of ``obj``, with its tensors moved into ``sink``."""
    name = type(obj).__name__ if path is None else path
    body: dict[str, Any] = {}
    for spec in specs:
        value = getattr(obj, spec.name)
        encode = spec.codec.encode
        body[spec.name] = value if encode is None else encode(value, f"{name}.{spec.name}", sink)
    return body


def decode_fields(
    cls_name: str, body: dict[Any, Any], specs: tuple[FieldSpec, ...], table: BufferTable
) -> dict[str, Any]:
    """Checked keyword arguments for the message class; unknown keys are ignored on purpose.

    Ignoring them is the forward tolerance of a minor version: a newer peer may add optional
    fields. Missing optional keys take the dataclass defaults; a missing required key is
    MalformedFrame.
    """
    kwargs: dict[str, Any] = {}
    for spec in specs:
        if spec.name in body:
            kwargs[spec.name] = spec.codec.decode(body[spec.name], f"{cls_name}.{spec.name}", table)
        elif spec.required:
            raise MalformedFrame(f"{cls_name}: required field {spec.name!r} is missing")
    return kwargs
