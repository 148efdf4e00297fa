"""Exceptions raised by the engine.

Every error the engine raises on bad input derives from :class:`EngineError`, so the service can map
the whole tree onto gRPC status codes in one place.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidArgument(EngineError, ValueError):
    """An argument is malformed; ``field`` names the argument (or dataset field) at fault."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFound(EngineError):
    """A model reference does not resolve to a model that exists here."""


class UnsupportedArchitecture(EngineError):
    """The model's architecture has no adapter; the message names the supported ones."""


class NotSupported(EngineError):
    """A valid request that this engine cannot carry out (e.g. an option on the wrong device)."""


class ResourceExhausted(EngineError):
    """A request exceeds a size or memory limit."""


class Stopped(Exception):
    """A long computation ended early because its caller's ``should_stop()`` returned True.

    Not an :class:`EngineError`: nothing was wrong with the request, and a caller that asked to
    stop (a cancelled job) catches this instead of reporting a failure. Nothing partial is returned.
    """
