"""GetServerInfo: version, allow-listed models, devices, limits."""

from __future__ import annotations

import dataclasses
import functools
from importlib import metadata

from edgeprune.service import translate
from edgeprune.service.config import Config
from edgeprune.service.memory_check import allow_listed_shape, estimate_dtype, memory_budget
from edgeprune.service.validation import BUILTIN_TASKS
from edgeprune.v1 import common_pb2, server_pb2


def version() -> str:
    try:
        return metadata.version("edgeprune")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def devices(requested: str) -> tuple[server_pb2.Device, ...]:
    """The devices workers of this configuration use (torch is imported here, once, unless
    the configuration says cpu)."""
    out = [server_pb2.Device(name="cpu", description="CPU")]
    if requested == "cpu":
        return tuple(out)
    import torch

    if requested != "cpu" and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            out.append(server_pb2.Device(name=f"cuda:{index}", description=props.name,
                                         memory_bytes=props.total_memory))
        if requested in ("auto", "cuda"):
            out = out[1:]
    return tuple(out)


class ServerHandler:
    def __init__(self, config: Config) -> None:
        self.config = config

    def info(self) -> server_pb2.GetServerInfoResponse:
        config = self.config
        limits = server_pb2.Limits(**{
            f.name: getattr(config.limits, f.name)
            for f in dataclasses.fields(config.limits)
            if f.name in server_pb2.Limits.DESCRIPTOR.fields_by_name
        }, worker_memory_bytes=memory_budget(config) or 0)
        checked = limits.worker_memory_bytes > 0
        return server_pb2.GetServerInfoResponse(
            version=version(),
            models=[server_pb2.ModelInfo(name=name, ref=ref if config.show_model_refs else "",
                                         memory_checked=checked and
                                         allow_listed_shape(config, ref) is not None)
                    for name, ref in sorted(config.models.items())],
            devices=devices(config.device),
            limits=limits,
            tasks=BUILTIN_TASKS,
            task_details=translate.task_details(),
            methods=[m for m in common_pb2.Method.values() if m != common_pb2.METHOD_UNSPECIFIED],
            default_dtype=translate.DTYPES_BY_NAME[estimate_dtype(config)],
        )
