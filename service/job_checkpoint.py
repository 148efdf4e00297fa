"""A discovery job's checkpoint (``EPJOB1``): a JSON header (the size index and circuits done,
kept for checkpoints of earlier versions, which ran one run per size), then the engine's own
checkpoint bytes. No pickle: JSON and safetensors only."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from edgeprune.engine.circuit import Circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.storage import errors as storage_errors

CHECKPOINT_MAGIC = b"EPJOB1\n"
CHECKPOINT_CORRUPT = "CHECKPOINT_CORRUPT"  # JobWarning.reason: the attempt restarted from step 0


def pack_checkpoint(size_index: int, done: list[Circuit], engine_state: bytes) -> bytes:
    header = json.dumps({"size_index": size_index,
                         "done": [c.to_dict() for c in done]}).encode()
    return CHECKPOINT_MAGIC + struct.pack("<Q", len(header)) + header + engine_state


def unpack_checkpoint(data: bytes) -> tuple[int, list[Circuit], bytes | None]:
    """Inverse of `pack_checkpoint`; InvalidArgument (field "checkpoint") for anything else."""
    if not data.startswith(CHECKPOINT_MAGIC):
        raise InvalidArgument("the job's checkpoint is not an edgeprune job checkpoint",
                              field="checkpoint")
    offset = len(CHECKPOINT_MAGIC)
    try:
        (length,) = struct.unpack_from("<Q", data, offset)
        header = json.loads(data[offset + 8: offset + 8 + length])
        done = [Circuit.from_dict(c) for c in header["done"]]
        size_index = int(header["size_index"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise InvalidArgument(f"the job's checkpoint header is unreadable: {err}",
                              field="checkpoint") from err
    return size_index, done, data[offset + 8 + length:] or None


def load_checkpoint(fetch: Callable[[], bytes],
                    warning: Callable[[dict[str, Any]], None]) -> bytes | None:
    """The job's stored checkpoint from ``fetch()``, or None when it cannot be used: its bytes
    fail their hash, it is gone, or it is no job checkpoint. The attempt then starts again from
    step 0 and ``warning`` says so: losing the steps done is better than failing the job for
    good. An unreachable database is no verdict on the checkpoint and propagates."""
    try:
        data = fetch()
        unpack_checkpoint(data)
    except (storage_errors.IntegrityError, storage_errors.NotFound, InvalidArgument) as err:
        checkpoint_discarded(warning, err)
        return None
    return data


def checkpoint_discarded(warning: Callable[[dict[str, Any]], None], err: Exception) -> None:
    warning({"reason": CHECKPOINT_CORRUPT, "size_index": 0,
             "message": f"the stored checkpoint cannot be used ({err}); "
                        "this attempt starts again from step 0"})
