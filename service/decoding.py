"""Request bytes into messages, and what to answer when they are not a valid one.

grpc runs a method's request deserializer before any servicer code, and an exception raised
there leaves as UNKNOWN carrying the exception's text. `checked` wraps a deserializer so that it
never raises: bytes that are not the request message (corrupt wire data, strings that are not
UTF-8) and messages holding text the database cannot store come out as a `Rejected` carrying an
INVALID_ARGUMENT that names the field, which `interceptors.RequestCheckInterceptor` answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from edgeprune.service.errors import InvalidArgument
from edgeprune.service.validation import Violations, text_violations

WHOLE_REQUEST = "request"  # the field named when no single field is at fault
_LENGTH_DELIMITED = 2
_FIXED_SIZES = {1: 8, 5: 4}  # wire type -> bytes


@dataclass(frozen=True)
class Rejected:
    """What a checked deserializer returns for a request it cannot accept."""

    error: InvalidArgument


def checked(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` returning a `Rejected` instead of raising or passing bad text on."""
    # Generated code passes ``Message.FromString``, a class method: its class is the type.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception as err:  # noqa: BLE001 - it only ever sees the client's bytes
            return Rejected(_undecodable(data, descriptor, err))
        if isinstance(message, Message):
            v = Violations()
            for field, problem in text_violations(message):
                v.bad(field, problem)
            try:
                v.raise_if_any()
            except InvalidArgument as err:
                return Rejected(err)
        return message

    return deserialize


def _undecodable(data: bytes, descriptor: Descriptor | None, err: Exception) -> InvalidArgument:
    name = descriptor.full_name if isinstance(descriptor, Descriptor) else "request message"
    field = _bad_utf8_field(data, descriptor) if isinstance(descriptor, Descriptor) else None
    if field is not None:
        return InvalidArgument("is not valid UTF-8 (strings must be; a lone surrogate "
                               "cannot be encoded)", field=field)
    return InvalidArgument(f"the bytes are not a valid {name} ({err})", field=WHOLE_REQUEST)


def _bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The path of the first string field in ``data`` whose bytes are not UTF-8, found by
    walking the wire format (the parser only says that one is); None if there is none or the
    bytes are corrupt in another way."""
    seen: Counter[int] = Counter()
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in _FIXED_SIZES:
                pos += _FIXED_SIZES[wire_type]
            elif wire_type == _LENGTH_DELIMITED:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is not None:
                    found = _bad_utf8_in(field, chunk, _path(field, prefix, seen))
                    if found is not None:
                        return found
            else:  # groups: not used by proto3
                return None
    except IndexError:
        return None
    return None


def _bad_utf8_in(field: FieldDescriptor, chunk: bytes, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return path
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        found = _bad_utf8_field(chunk, field.message_type, f"{path}.")
        if found is not None and field.message_type.GetOptions().map_entry:
            return path  # a map entry's key or value: the map is the field
        return found
    return None


def _path(field: FieldDescriptor, prefix: str, seen: Counter[int]) -> str:
    """``spec.sizes[1]`` for the second occurrence of a repeated field (a map: its name)."""
    path = f"{prefix}{field.name}"
    if not field.is_repeated:
        return path
    index = seen[field.number]
    seen[field.number] += 1
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return path
    return f"{path}[{index}]"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
