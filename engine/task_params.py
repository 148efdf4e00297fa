"""The parameters a built-in task generator takes, declared as data and checked without torch.

Each task lists its :class:`Param` entries (``edgeprune.engine.contract.BUILTIN``). A request's
parameters arrive as text (the API's ``TaskSource.params`` is ``map<string, string>``) or as Python
values (``build_task(..., params={"n_choices": 3})``); :func:`parse_params` turns either into the
typed keyword arguments of the generator, filling defaults, and :func:`param_errors` lists every
problem so a service can report them all at once. A task without parameters rejects every key.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edgeprune.engine.errors import InvalidArgument

ParamType = Literal["int", "float", "bool", "choice"]
MAX_PARAM_TEXT = 64  # characters of one value given as text: no knob needs more
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class Param:
    """One knob of a generator: ``int`` / ``float`` in [minimum, maximum], ``bool``, or one of
    ``choices``."""

    name: str
    type: ParamType
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, value: Any) -> Any:
        """The typed value of ``value`` (text or a Python value); a ValueError or TypeError says
        what is wrong."""
        if isinstance(value, str):
            value = value.strip()
            if len(value) > MAX_PARAM_TEXT:
                raise ValueError(f"is longer than {MAX_PARAM_TEXT} characters")
        if self.type == "bool":
            return _bool(value)
        if self.type == "choice":
            if value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        number = _int(value) if self.type == "int" else _float(value)
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            raise ValueError(f"must be in [{_show(self.minimum)}, {_show(self.maximum)}], "
                             f"got {_show(number)}")
        return number

    def summary(self) -> str:
        """What values it takes, e.g. "int in [2, 4], default 4"."""
        if self.type == "choice":
            kind = f"one of {', '.join(self.choices)}"
        elif self.type == "bool":
            kind = "true or false"
        else:
            kind = f"{self.type} in [{_show(self.minimum)}, {_show(self.maximum)}]"
        return f"{kind}, default {format_value(self.default)}"


def format_value(value: Any) -> str:
    """A typed value as the API's text (booleans lowercase, as :meth:`Param.parse` reads them)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _show(value: float | None) -> str:
    return "-inf" if value is None else str(int(value) if float(value).is_integer() else value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"must be true or false, got {value!r}")


def _int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise TypeError(f"must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be an integer, got {value!r}") from None


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def param_field(key: str) -> str:
    """The field path of one parameter, as map entries are named elsewhere (``params['key']``)."""
    return f"params[{key!r}]"


def param_errors(
    schema: tuple[Param, ...], given: Mapping[str, Any], *, task: str
) -> Iterator[tuple[str, str]]:
    """(key, problem) of every given parameter the schema rejects: unknown key, wrong type, out
    of range or not one of the choices."""
    known = {p.name: p for p in schema}
    for key, value in given.items():
        param = known.get(key)
        if param is None:
            allowed = ", ".join(known) if known else "none"
            yield key, f"task {task!r} has no parameter {key!r} (its parameters: {allowed})"
            continue
        try:
            param.parse(value)
        except (TypeError, ValueError) as err:
            yield key, str(err)


def parse_params(
    schema: tuple[Param, ...], given: Mapping[str, Any] | None, *, task: str
) -> dict[str, Any]:
    """Every parameter of the schema, typed: the given value or the default. Raises
    InvalidArgument on ``params['key']`` for the first problem of :func:`param_errors`."""
    given = dict(given or {})
    for key, problem in param_errors(schema, given, task=task):
        raise InvalidArgument(f"{param_field(key)}: {problem}", field=param_field(key))
    return {p.name: p.parse(given[p.name]) if p.name in given else p.default for p in schema}
