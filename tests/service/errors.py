"""Reading the google.rpc.Status details of a failed call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def details(err: grpc.RpcError) -> tuple[str, str, list[str]]:
    """(code name, ErrorInfo reason, BadRequest fields) of a failed call."""
    status = rpc_status.from_call(err)
    reason, fields = "", []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = [v.field for v in bad.field_violations]
    return err.code().name, reason, fields


def fails(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, str, list[str]]:
    """Call and return the details of its error (fails the test if it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return details(err)
    raise AssertionError("the call succeeded")
