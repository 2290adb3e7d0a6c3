#!/usr/bin/env python3
"""A client conveyor did not write, on conveyor's gRPC port: the gRPC project's own Python
packages (grpcio, grpcio-health-checking, grpcio-reflection; tests/grpc/requirements.txt).

Prints what it was told as JSON (or, for `watch`, one status per line), and leaves judging it to
the Rust test that runs it (crates/conveyor/tests/it/grpc_ecosystem.rs).

  ecosystem.py describe http://127.0.0.1:PORT   health and reflection, as one JSON object
  ecosystem.py check http://127.0.0.1:PORT NAME...   Check for each service NAME, as JSON
  ecosystem.py watch http://127.0.0.1:PORT NAME   Watch NAME: a line per status, then END <code>
"""

import json
import sys

import grpc
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

INGEST_SERVICE = "conveyor.v1.IngestService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# How long `describe` waits for the server to report SERVING before it asks anything else.
SERVING_WITHIN_SECS = 10


def channel(url):
    target = url.removeprefix("http://").rstrip("/")
    # A proxy from the environment must not stand between the test and a local port.
    return grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])


def status_name(status):
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def check(health, service):
    """SERVING / NOT_SERVING, or the gRPC code of the refusal (NOT_FOUND for an unknown name)."""
    try:
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return status_name(answer.status)
    except grpc.RpcError as error:
        return error.code().name


def watch_until_serving(health):
    """The statuses a Watch of the server ("") sent, up to the first SERVING."""
    seen = []
    stream = health.Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=SERVING_WITHIN_SECS
    )
    try:
        for answer in stream:
            seen.append(status_name(answer.status))
            if seen[-1] == "SERVING":
                break
    except grpc.RpcError as error:
        seen.append("END " + error.code().name)
    finally:
        stream.cancel()
    return seen


def reflection_v1alpha(chan):
    """What grpcio-reflection's own client (v1alpha, as Postman and older grpcurl use) learns."""
    database = ProtoReflectionDescriptorDatabase(chan)
    services = sorted(database.get_services())
    ingest_file = database.FindFileContainingSymbol(INGEST_SERVICE)
    health_file = database.FindFileContainingSymbol(HEALTH_SERVICE)
    # A descriptor pool over the server's answers resolves every method's message types.
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(INGEST_SERVICE)
    methods = [
        {
            "name": method.name,
            "input": method.input_type.full_name,
            "output": method.output_type.full_name,
            "client_streaming": method.client_streaming,
            "server_streaming": method.server_streaming,
        }
        for method in service.methods
    ]
    request_fields = sorted(
        field.name for field in pool.FindMessageTypeByName("conveyor.v1.IngestRequest").fields
    )
    return {
        "services": services,
        "ingest_file": ingest_file.name,
        "ingest_file_services": [s.name for s in ingest_file.service],
        "health_file": health_file.name,
        "methods": methods,
        "ingest_request_fields": request_fields,
    }


def reflection_v1(chan):
    """The v1 service (what current grpcurl asks first), spoken with the v1alpha messages:
    the two protocols are the same messages under another package name."""
    call = chan.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INGEST_SERVICE),
    ]
    listed, files = [], []
    for answer in call(iter(requests), timeout=10):
        if answer.HasField("list_services_response"):
            listed = sorted(s.name for s in answer.list_services_response.service)
        elif answer.HasField("file_descriptor_response"):
            files = list(answer.file_descriptor_response.file_descriptor_proto)
        elif answer.HasField("error_response"):
            raise SystemExit(f"v1 reflection error: {answer.error_response}")
    names = [FileDescriptorProto.FromString(encoded).name for encoded in files]
    return {"services": listed, "files": names}


def describe(url):
    chan = channel(url)
    health = health_pb2_grpc.HealthStub(chan)
    watched = watch_until_serving(health)
    report = {
        "watch": watched,
        "health": {
            name: check(health, name) for name in ["", INGEST_SERVICE, "no.such.Service"]
        },
        "reflection_v1alpha": reflection_v1alpha(chan),
        "reflection_v1": reflection_v1(chan),
    }
    print(json.dumps(report, indent=1))


def check_all(url, names):
    health = health_pb2_grpc.HealthStub(channel(url))
    print(json.dumps({name: check(health, name) for name in names}))


def watch(url, name):
    """Prints each status as it arrives; `END OK` when the server ends the stream, `END <code>`
    when it fails."""
    health = health_pb2_grpc.HealthStub(channel(url))
    try:
        for answer in health.Watch(health_pb2.HealthCheckRequest(service=name)):
            print(status_name(answer.status), flush=True)
        print("END OK", flush=True)
    except grpc.RpcError as error:
        print("END " + error.code().name, flush=True)


def main(argv):
    if len(argv) >= 3 and argv[1] == "describe":
        describe(argv[2])
    elif len(argv) >= 4 and argv[1] == "check":
        check_all(argv[2], argv[3:])
    elif len(argv) == 4 and argv[1] == "watch":
        watch(argv[2], argv[3])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
