"""The committed stubs match the .proto files, and the .proto files follow Google API style.

buf is not available here, so the lint reads the compiled descriptors (grpc_tools' protoc) and
checks the rules that matter: file options, package, naming of messages, fields, enums and RPCs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2, server_pb2

ROOT = Path(__file__).resolve().parents[2]
MODULES = [common_pb2, dataset_pb2, job_pb2, circuit_pb2, server_pb2]
CAMEL = re.compile(r"^[A-Z][a-zA-Z0-9]*$")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
RESOURCES = {"Dataset", "Job", "Circuit"}
EMPTY = "google.protobuf.Empty"


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    files = []
    for module in MODULES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def _upper_snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def _messages(messages, prefix=""):
    for message in messages:
        yield prefix + message.name, message
        yield from _messages(message.nested_type, prefix + message.name + ".")


def _enums(file: descriptor_pb2.FileDescriptorProto):
    yield from file.enum_type
    for _, message in _messages(file.message_type):
        yield from message.enum_type


def test_committed_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_proto_file_is_compiled_into_the_stubs() -> None:
    sources = {p.name for p in (ROOT / "protos" / "edgeprune" / "v1").glob("*.proto")}
    assert sources == {Path(f.name).name for f in _files()}


@pytest.mark.parametrize("file", _files(), ids=lambda f: f.name)
def test_file_options(file: descriptor_pb2.FileDescriptorProto) -> None:
    assert file.syntax == "proto3"
    assert file.package == "edgeprune.v1"
    assert file.name.startswith("edgeprune/v1/")
    options = file.options
    assert options.java_multiple_files
    assert options.java_package == "dev.edgeprune.v1"
    assert options.java_outer_classname == _camel_file(file.name) + "Proto"
    assert options.go_package.endswith(";edgeprunev1")
    assert options.csharp_namespace == "Edgeprune.V1"


def _camel_file(name: str) -> str:
    return "".join(part.capitalize() for part in Path(name).stem.split("_"))


@pytest.mark.parametrize("file", _files(), ids=lambda f: f.name)
def test_message_and_field_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    for full_name, message in _messages(file.message_type):
        if message.options.map_entry:
            continue
        assert CAMEL.match(message.name), f"message {full_name} is not CamelCase"
        for field in message.field:
            assert SNAKE.match(field.name), f"field {full_name}.{field.name} is not snake_case"
        numbers = [f.number for f in message.field]
        assert len(numbers) == len(set(numbers))
        # AIP-122/140: the resource name is field 1 `name`; times end in _time.
        if message.name in RESOURCES:
            assert message.field[0].name == "name" and message.field[0].number == 1
        for field in message.field:
            if field.type_name == ".google.protobuf.Timestamp":
                assert field.name.endswith("_time") or field.name == "time", field.name


@pytest.mark.parametrize("file", _files(), ids=lambda f: f.name)
def test_enum_values_are_prefixed_and_start_unspecified(
    file: descriptor_pb2.FileDescriptorProto,
) -> None:
    for enum in _enums(file):
        assert CAMEL.match(enum.name), enum.name
        prefix = _upper_snake(enum.name)
        assert enum.value[0].name == f"{prefix}_UNSPECIFIED" and enum.value[0].number == 0, enum.name
        for value in enum.value:
            assert UPPER_SNAKE.match(value.name), value.name
            assert value.name.startswith(prefix + "_"), f"{value.name} lacks the prefix {prefix}_"


@pytest.mark.parametrize("file", _files(), ids=lambda f: f.name)
def test_rpc_request_and_response_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    for service in file.service:
        assert service.name.endswith("Service"), service.name
        for method in service.method:
            assert CAMEL.match(method.name), method.name
            assert method.input_type == f".edgeprune.v1.{method.name}Request", method.name
            output = method.output_type.removeprefix(".")
            allowed = {f"edgeprune.v1.{method.name}Response", EMPTY}
            allowed |= {f"edgeprune.v1.{r}" for r in RESOURCES}
            if method.server_streaming:  # a stream of a resource's events (WatchJob -> JobEvent)
                allowed |= {f"edgeprune.v1.{r}Event" for r in RESOURCES}
            assert output in allowed, f"{method.name} returns {output}"
            # AIP-158: List calls page; AIP-131: Get and Delete take the resource name.
            fields = {f.name for f in _request(method).field}
            if method.name.startswith("List"):
                assert {"page_size", "page_token"} <= fields, method.name
                response = {f.name for f in _message(method.output_type).field}
                assert "next_page_token" in response, method.name
            named = method.name.startswith(("Get", "Delete", "Cancel", "Watch", "Export"))
            if named and method.name != "GetServerInfo":
                assert "name" in fields, method.name


def test_request_ids_on_every_creating_call() -> None:
    """AIP-155: every call that creates a resource takes a request_id."""
    assert "request_id" in job_pb2.SubmitJobRequest.DESCRIPTOR.fields_by_name
    assert "request_id" in circuit_pb2.EvaluateCircuitRequest.DESCRIPTOR.fields_by_name
    assert "request_id" in dataset_pb2.DatasetMetadata.DESCRIPTOR.fields_by_name


def _message(type_name: str):
    from google.protobuf import descriptor_pool

    return _to_proto(descriptor_pool.Default().FindMessageTypeByName(type_name.removeprefix(".")))


def _request(method: descriptor_pb2.MethodDescriptorProto) -> descriptor_pb2.DescriptorProto:
    return _message(method.input_type)


def _to_proto(descriptor) -> descriptor_pb2.DescriptorProto:
    proto = descriptor_pb2.DescriptorProto()
    descriptor.CopyToProto(proto)
    return proto
