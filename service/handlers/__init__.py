"""Transport-free request logic: plain methods on repositories, no gRPC, no asyncio.

Servicers call these (in a thread, since storage is synchronous) and convert the records they
return into messages. Errors are raised as `edgeprune.service.errors` / storage errors.
"""

from edgeprune.service.handlers.circuits import CircuitHandler
from edgeprune.service.handlers.datasets import DatasetHandler
from edgeprune.service.handlers.jobs import JobHandler
from edgeprune.service.handlers.server import ServerHandler

__all__ = ["CircuitHandler", "DatasetHandler", "JobHandler", "ServerHandler"]
