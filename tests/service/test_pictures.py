"""Pictures over a real server and worker: a finished tiny Edge Pruning sweep exported as a PNG
drawing (graphviz and built-in layouts), its per-layer plot, and the job's training-curve and
faithfulness plots; bad options answer INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import pytest

from edgeprune.v1 import circuit_pb2, job_pb2
from tests.engine.test_drawing import check_picture
from tests.service.errors import fails
from tests.service.harness import Server, edge_pruning_spec


@pytest.fixture(scope="module")
def finished(live_server: Server) -> tuple[Server, job_pb2.Job]:
    spec = edge_pruning_spec(steps=6, sizes=(0.9, 0.7))
    job = live_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    done = live_server.wait_done(job.name)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    return live_server, done


def export(server: Server, **request: object) -> tuple[str, str, bytes]:
    chunks = list(server.circuits.ExportCircuit(circuit_pb2.ExportCircuitRequest(**request),
                                                timeout=120))
    return chunks[0].content_type, chunks[0].filename, b"".join(c.data for c in chunks)


def job_plot(server: Server, **request: object) -> tuple[str, str, bytes]:
    chunks = list(server.jobs.ExportJobPlot(job_pb2.ExportJobPlotRequest(**request), timeout=120))
    return chunks[0].content_type, chunks[0].filename, b"".join(c.data for c in chunks)


def test_circuit_pictures(finished: tuple[Server, job_pb2.Job]) -> None:
    server, job = finished
    name = job.result.circuits[0]
    for layout in (circuit_pb2.DRAWING_LAYOUT_BUILTIN, circuit_pb2.DRAWING_LAYOUT_UNSPECIFIED):
        kind, filename, png = export(server, name=name, format=circuit_pb2.EXPORT_FORMAT_PNG,
                                     layout=layout)
        assert kind == "image/png" and filename.endswith(".png")
        check_picture(png, min_size=150)
    _, _, svg = export(server, name=name, format=circuit_pb2.EXPORT_FORMAT_SVG, top_k=5,
                       view=circuit_pb2.DRAWING_VIEW_NODES,
                       layout=circuit_pb2.DRAWING_LAYOUT_BUILTIN)
    assert b"<svg" in svg and b"5 most important of" in svg
    _, filename, bars = export(server, name=name, format=circuit_pb2.EXPORT_FORMAT_PNG,
                               plot=circuit_pb2.CIRCUIT_PLOT_PER_LAYER)
    assert filename.endswith("-per-layer.png")
    check_picture(bars, min_colours=4)
    for request, field in (
        ({"format": circuit_pb2.EXPORT_FORMAT_PNG, "top_k": -1}, "top_k"),
        ({"format": circuit_pb2.EXPORT_FORMAT_PNG, "top_k": 10**6}, "top_k"),
        ({"format": circuit_pb2.EXPORT_FORMAT_JSON, "top_k": 3}, "top_k"),
        ({"format": circuit_pb2.EXPORT_FORMAT_SVG, "nodes": ["a0.x"]}, "nodes"),
        ({"format": circuit_pb2.EXPORT_FORMAT_SVG, "view": 9}, "view"),
        ({"format": circuit_pb2.EXPORT_FORMAT_DOT, "plot": 2}, "plot"),
    ):
        code, _, fields = fails(lambda r=request: export(server, name=name, **r))
        assert (code, fields[:1]) == ("INVALID_ARGUMENT", [field]), request


def test_job_plots(finished: tuple[Server, job_pb2.Job]) -> None:
    server, job = finished
    kind, filename, png = job_plot(server, name=job.name, format=job_pb2.IMAGE_FORMAT_PNG)
    assert kind == "image/png" and filename.endswith("-training.png")  # Edge Pruning: training
    check_picture(png, min_size=400, min_colours=20)
    kind, filename, svg = job_plot(server, name=job.name, plot=job_pb2.JOB_PLOT_FAITHFULNESS)
    assert kind == "image/svg+xml" and filename.endswith("-faithfulness.svg")
    assert b"CPR" in svg and b"CMD" in svg
    assert fails(lambda: job_plot(server, name="jobs/missing"))[0] == "NOT_FOUND"
    assert fails(lambda: job_plot(server, name=job.name, plot=7))[::2] == (
        "INVALID_ARGUMENT", ["plot"])
