"""The ``edgeprune`` command line.

    edgeprune serve | worker | migrate [options]   run the service (needs the server extra)
    edgeprune submit [JOB_FILE] [--model ...] [--watch | --wait]
    edgeprune jobs list | get | cancel | watch | delete | plot
    edgeprune datasets upload | list | get | delete
    edgeprune circuits list | show | plot | export | import | compare | evaluate | delete
    edgeprune info                                 the server's models, devices and limits
    edgeprune demo                                 a whole run on the default model

Tables by default, ``--json`` for scripts. Exit codes: 0 success, 2 usage, 3 invalid
argument, 4 not found, 5 already exists, 6 failed precondition, 7 resource exhausted,
8 unauthenticated / permission denied, 9 server unavailable or deadline exceeded,
10 job failed, 11 job cancelled, 130 interrupted, 1 anything else.

Only ``serve``, ``worker``, ``migrate`` and ``demo`` import the server side, and only when run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from edgeprune.v1 import common_pb2, server_pb2

from ._core import DEFAULT_TARGET, DEFAULT_TIMEOUT, LB_POLICIES, check_finished
from ._output import (
    CIRCUIT_COLUMNS,
    DATASET_COLUMNS,
    describe_circuit,
    describe_dataset,
    describe_job,
    enum_name,
    job_columns,
    print_json,
    print_pairs,
    print_table,
    to_dict,
)
from ._spec import load_job_file
from ._sync import Client
from .demo import add_demo_arguments, run_demo
from .errors import EdgepruneError, InvalidArgument, NotFound
from .progress import JobProgress

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _labels(pairs: Sequence[str] | None, *, field: str = "label") -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{field}s are KEY=VALUE, got {pair!r}", field=field)
        out[key] = value
    return out


def _task_params(pairs: Sequence[str] | None) -> dict[str, str] | None:
    """--task-param KEY=VALUE flags (None when there are none, so a job file's stay)."""
    return _labels(pairs, field="task_param") or None


def _client(args: argparse.Namespace) -> Client:
    tls: Any = args.ca_file or (True if args.tls else None)
    return Client(args.target, token=args.token, tls=tls, timeout=args.timeout,
                  insecure=True if args.insecure else None, load_balancing=args.load_balancing)


def _follow(client: Client, name: str, args: argparse.Namespace, *, after: int = 0) -> int:
    """Watch a job to its end (a progress bar, or JSON lines); its final state gives the exit code."""
    if args.json:
        for event in client.watch(name, after_sequence=after):
            print(json.dumps(to_dict(event)), flush=True)
        check_finished(client.get_job(name))
        return EXIT_OK
    printer = JobProgress()
    try:
        for event in client.watch(name, after_sequence=after):
            printer(event)
    finally:
        printer.close()
    job = client.get_job(name)
    print_pairs(describe_job(job))
    check_finished(job)
    return EXIT_OK


# -- commands -----------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    options: dict[str, Any] = load_job_file(args.job_file) if args.job_file else {}
    flags = {
        "model": args.model, "task": args.task, "task_examples": args.task_examples,
        "task_seed": args.task_seed, "task_params": _task_params(args.task_param),
        "dataset": args.dataset, "examples": args.examples,
        "method": args.method, "sparsity": args.sparsity, "edges": args.edges,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "lr": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "warm_start": args.warm_start,
        "warm_start_ig_steps": args.warm_start_ig_steps,
        "ablation": args.ablation, "loss": args.loss, "dtype": args.dtype,
        "activation_checkpointing": args.activation_checkpointing,
        "data_parallel_workers": args.data_parallel_workers,
        "priority": args.priority, "request_id": args.request_id,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if "spec" in options and set(given) - {"priority", "request_id"}:
        raise InvalidArgument(
            "a job file in SubmitJobRequest form cannot be combined with job flags",
            field=min(set(given) - {"priority", "request_id"}),
        )
    for group in ({"task", "dataset", "examples"}, {"sparsity", "edges", "sizes"}):
        if group & set(given):  # a data (size) flag replaces the file's data source (size)
            options = {k: v for k, v in options.items() if k not in group}
    options.update(given)
    labels = {**options.pop("labels", {}), **_labels(args.label)}
    if "model" not in options and "spec" not in options:
        raise InvalidArgument("--model (or a job file with `model`) is required", field="model")
    with _client(args) as client:
        job = client.submit(labels=labels, **options)
        if not (args.watch or args.wait):
            print_json(job) if args.json else print(job.name)
            return EXIT_OK
        if not args.json:
            print(f"submitted {job.name}", file=sys.stderr)
        return _follow(client, job.name, args) if args.watch else _wait_quiet(client, job.name, args)


def _wait_quiet(client: Client, name: str, args: argparse.Namespace) -> int:
    job = client.wait(name)
    print_json(job) if args.json else print_pairs(describe_job(job))
    return EXIT_OK


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.list_jobs(states=args.state, model=args.model, labels=_labels(args.label))
        rows = [job for _, job in zip(range(args.limit), jobs)]
        models = {} if args.json else _circuit_models(client, rows)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, job_columns(models), empty="no jobs")
    return EXIT_OK


def _circuit_models(client: Client, jobs: Sequence[Any]) -> dict[str, str]:
    """The model of each circuit the evaluation jobs among ``jobs`` read (a deleted one is
    left out)."""
    models = {}
    for name in sorted({job.evaluation.circuit for job in jobs if job.evaluation.circuit}):
        with contextlib.suppress(NotFound):
            models[name] = client.get_circuit(name).model
    return models


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_job(args.job)
    print_json({"deleted": args.job}) if args.json else print(f"deleted {args.job}")
    return EXIT_OK


def cmd_jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job, full=args.full)
    print_json(job) if args.json else print_pairs(describe_job(job))
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    print_json(job) if args.json else print_pairs(describe_job(job))
    return EXIT_OK


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, client.get_job(args.job).name, args, after=args.after)


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        dataset = client.upload_dataset(
            args.path, display_name=args.name, labels=_labels(args.label), request_id=args.request_id
        )
    print_json(dataset) if args.json else print_pairs(describe_dataset(dataset))
    return EXIT_OK


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = [d for _, d in zip(range(args.limit), client.list_datasets())]
    print_json(rows) if args.json else print_table(rows, DATASET_COLUMNS, empty="no datasets")
    return EXIT_OK


def cmd_datasets_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        dataset = client.get_dataset(args.dataset)
    print_json(dataset) if args.json else print_pairs(describe_dataset(dataset))
    return EXIT_OK


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_dataset(args.dataset)
    if args.json:
        print_json({"deleted": args.dataset})
    return EXIT_OK


def cmd_circuits_list(args: argparse.Namespace) -> int:
    filters = {
        "model": args.model, "task": args.task, "dataset": args.dataset, "method": args.method,
        "min_edges": args.min_edges, "max_edges": args.max_edges, "job": args.job,
        "contains_edge": args.contains_edge, "contains_node": args.contains_node,
    }
    with _client(args) as client:
        circuits = client.list_circuits(**filters)
        rows = [c for _, c in zip(range(args.limit), circuits)]
    print_json(rows) if args.json else print_table(rows, CIRCUIT_COLUMNS, empty="no circuits")
    return EXIT_OK


def cmd_circuits_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        circuit = client.get_circuit(args.circuit, full=args.edges > 0 or args.json)
        svg = client.export_circuit(circuit.name, args.svg, format="svg") if args.svg else None
    if args.json:
        print_json(circuit)
    else:
        print_pairs(describe_circuit(circuit))
        edges = top_edges(circuit)[: args.edges]
        if edges:
            print(f"\ntop {len(edges)} edges by {importance_name(circuit)}:")
            print_table(edges, [("EDGE", lambda e: e.name), ("SCORE", lambda e: f"{e.score:.4g}")])
    if svg is not None:
        print(f"wrote {svg}", file=sys.stderr)
    return EXIT_OK


def top_edges(circuit: Any) -> list[Any]:
    """The edges most important first, as the server's drawings rank them: Edge Pruning's
    scores are log-alphas (a higher one keeps the edge more often, a very negative one is
    firmly off), the other methods' are attributions (larger magnitude matters more)."""
    if circuit.method == common_pb2.METHOD_EDGE_PRUNING:
        return sorted(circuit.edges, key=lambda e: -e.score)
    return sorted(circuit.edges, key=lambda e: -abs(e.score))


def importance_name(circuit: Any) -> str:
    return ("log-alpha (keep probability)" if circuit.method == common_pb2.METHOD_EDGE_PRUNING
            else "|score|")


def cmd_circuits_plot(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.export_circuit(args.circuit, args.output, format=args.format,
                                     plot=args.kind, top_k=args.top_k, nodes=args.node or (),
                                     view=args.view, layout=args.layout)
    print_json({"path": str(path)}) if args.json else print(path)
    return EXIT_OK


def cmd_jobs_plot(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.export_job_plot(args.job, args.output, plot=args.kind, format=args.format)
    print_json({"path": str(path)}) if args.json else print(path)
    return EXIT_OK


def cmd_circuits_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.export_circuit(args.circuit, args.path, format=args.format)
    print_json({"path": str(path)}) if args.json else print(path)
    return EXIT_OK


def cmd_circuits_import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        circuit = client.import_circuit(args.file, model=args.model, method=args.method,
                                        task=args.task, request_id=args.request_id)
    print_json(circuit) if args.json else print_table([circuit], CIRCUIT_COLUMNS)
    return EXIT_OK


def cmd_circuits_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_circuit(args.circuit)
    print_json({"deleted": args.circuit}) if args.json else print(f"deleted {args.circuit}")
    return EXIT_OK


def cmd_circuits_compare(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.compare_circuits(args.first, args.second)
    if args.json:
        print_json(result)
        return EXIT_OK
    print_pairs(
        [
            ("edge jaccard", f"{result.edge_jaccard:.4f}"),
            ("node jaccard", f"{result.node_jaccard:.4f}"),
            ("shared edges", str(len(result.shared_edges))),
            ("only in first", str(len(result.first_only_edges))),
            ("only in second", str(len(result.second_only_edges))),
            ("shared nodes", str(len(result.shared_nodes))),
            ("nodes only in first", str(len(result.first_only_nodes))),
            ("nodes only in second", str(len(result.second_only_nodes))),
        ]
    )
    return EXIT_OK


def cmd_circuits_evaluate(args: argparse.Namespace) -> int:
    options = {
        "task": args.task, "task_examples": args.task_examples,
        "task_params": _task_params(args.task_param), "dataset": args.dataset,
        "examples": args.examples, "ablation": args.ablation, "batch_size": args.batch_size,
    }
    with _client(args) as client:
        job = client.evaluate_circuit(args.circuit, **{k: v for k, v in options.items() if v is not None})
        if args.watch:
            print(job.name, file=sys.stderr)
            return _follow(client, job.name, args)
    print_json(job) if args.json else print(job.name)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.server_info()
    if args.json:
        print_json(info)
        return EXIT_OK
    print_pairs(
        [
            ("server", client.settings.target),
            ("version", info.version),
            ("models", ", ".join(m.name for m in info.models) or "-"),
            ("tasks", ", ".join(info.tasks) or "-"),
            *((f"task {t.name}", _task_summary(t)) for t in info.task_details),
            ("methods", ", ".join(enum_name(common_pb2.Method, m, "METHOD_").lower() for m in info.methods)),
            ("devices", ", ".join(d.name for d in info.devices) or "-"),
            ("max steps", str(info.limits.max_steps)),
            ("max batch size", str(info.limits.max_batch_size)),
            ("max examples", str(info.limits.max_examples)),
        ]
    )
    return EXIT_OK


def _task_summary(task: server_pb2.TaskInfo) -> str:
    """One task's metric and parameters, e.g. "logit_diff; n_choices: int in [2, 4], default 4"."""
    params = [f"{p.name}: {_param_values(p)}, default {p.default}" for p in task.params]
    return "; ".join([task.metric, *params]) if params else f"{task.metric}; no parameters"


def _param_values(param: server_pb2.TaskParam) -> str:
    if param.choices:
        return "one of " + ", ".join(param.choices)
    if param.type == "bool":
        return "true or false"
    bounds = [f"{v:g}" if param.HasField(f) else "" for f, v in
              (("minimum", param.minimum), ("maximum", param.maximum))]
    return f"{param.type} in [{bounds[0]}, {bounds[1]}]"


SERVICE_COMMANDS = ("serve", "worker", "migrate")  # handed to edgeprune.service.cli


def cmd_server(args: argparse.Namespace) -> int:
    """`serve` / `worker` / `migrate`: hand the rest of the command line (options, --help) to the
    service.

    The service is imported here, lazily, so the client needs none of its dependencies."""
    try:
        from edgeprune.service import cli as service
    except ImportError as error:
        print(
            f"edgeprune {args.command} needs the server extra: pip install 'edgeprune[server]' ({error})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    entry = {"serve": service.serve_main, "worker": service.worker_main,
             "migrate": service.migrate_main}[args.command]
    return int(entry(list(args.rest)) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args)  # the server runs in a subprocess: nothing of it is imported here


# -- parser -------------------------------------------------------------------------------


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="built-in task: ioi, gendered_pronoun, greater_than, "
                        "mcqa, arithmetic, ... (edgeprune info lists them)")
    parser.add_argument("--task-examples", type=int, metavar="N", help="examples to generate")
    parser.add_argument("--task-param", action="append", metavar="KEY=VALUE",
                        help="a parameter of the task's generator, e.g. n_choices=2 (repeat; "
                        "edgeprune info lists each task's)")
    parser.add_argument("--dataset", help="an uploaded dataset (datasets/ID or ID)")
    parser.add_argument("--examples", metavar="JSONL", help="inline examples from a JSONL file")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``edgeprune`` (also used for ``--help`` tests)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--target", default=None, help=f"server address ($EDGEPRUNE_TARGET, default {DEFAULT_TARGET})")
    group.add_argument("--token", default=None, help="bearer token ($EDGEPRUNE_TOKEN)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--ca-file", default=None, help="use TLS with this PEM CA bundle")
    group.add_argument("--insecure", action="store_true",
                       help="send the token without TLS to another host ($EDGEPRUNE_INSECURE=1; "
                       "only on a network you trust)")
    group.add_argument("--load-balancing", choices=LB_POLICIES, default=None,
                       help="round_robin: spread calls over every address of the target, e.g. "
                       "dns:///edgeprune-api-headless:50051 ($EDGEPRUNE_LOAD_BALANCING; "
                       "default pick_first)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline of each call in seconds")
    group.add_argument("--json", action="store_true", help="print JSON instead of tables")

    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Edge Pruning circuit discovery as a service: run it, submit jobs, query circuits.",
        epilog="Exit codes: 0 ok, 2 usage, 3 invalid argument, 4 not found, 5 already exists, "
        "6 failed precondition, 7 resource exhausted, 8 unauthenticated, 9 unavailable/deadline, "
        "10 job failed, 11 job cancelled, 130 interrupted, 1 other.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, text in (("serve", "run the API server (and a worker) on the embedded database"),
                       ("worker", "run job workers against the server's database"),
                       ("migrate", "upgrade the server's database schema and exit")):
        p = sub.add_parser(name, help=text, add_help=False, description=text + "; options are the service's")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_server)

    p = sub.add_parser("submit", parents=[common], help="submit a job from flags or a YAML/JSON job file")
    p.add_argument("job_file", nargs="?", help="YAML/JSON job file (flags override its values)")
    p.add_argument("--model", help="model on the server's allow-list, e.g. smollm2-135m")
    _add_data_flags(p)
    p.add_argument("--task-seed", type=int, help="seed of the task generator")
    p.add_argument("--method", help="edge_pruning (default), eap, eap_ig (over the input "
                   "embeddings, as MIB), eap_ig_edges (over the edge masks) or acdc")
    p.add_argument("--sparsity", type=float, action="append", help="target edge sparsity (repeat for a sweep)")
    p.add_argument("--edges", type=int, action="append", help="edges to keep (repeat for a sweep)")
    p.add_argument("--steps", type=int, help="Edge Pruning steps")
    p.add_argument("--warmup-steps", type=int, help="steps over which the sparsity target rises")
    p.add_argument("--lr", type=float, help="mask learning rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--warm-start", metavar="FROM",
                   help="eap_ig (the server's default): start the masks from EAP-IG scores; "
                        "none: every mask on, as in the paper")
    p.add_argument("--warm-start-ig-steps", type=int, metavar="N",
                   help="integration steps of the EAP-IG warm start")
    p.add_argument("--ablation", help="corrupted (default), zero or mean")
    p.add_argument("--loss", help="kl (default) or logit_diff")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each layer in the backward pass: less memory, more time")
    p.add_argument("--data-parallel-workers", type=int, metavar="N",
                   help="spread an Edge Pruning job over N processes (GPUs) of its worker")
    p.add_argument("--priority", type=int)
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--request-id", help="idempotency key (default: a fresh UUID)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    mode.add_argument("--wait", action="store_true", help="wait for the job quietly")
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, cancel and watch jobs").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = jobs.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--model")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)
    for action, func, text in (("get", cmd_jobs_get, "show a job"), ("cancel", cmd_jobs_cancel, "cancel a job"),
                               ("watch", cmd_jobs_watch, "follow a job's progress to its end"),
                               ("delete", cmd_jobs_delete,
                                "delete a finished job and its events (its circuits stay)")):
        p = jobs.add_parser(action, parents=[common], help=text)
        p.add_argument("job", help="jobs/ID or ID")
        if action == "get":
            p.add_argument("--full", action="store_true", help="include inline examples")
        if action == "watch":
            p.add_argument("--after", type=int, default=0, metavar="SEQ", help="skip events up to SEQ")
        p.set_defaults(func=func)

    p = jobs.add_parser("plot", parents=[common],
                        help="plot a job: training curves or faithfulness against size (SVG or PNG)")
    p.add_argument("job", help="jobs/ID or ID")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (or a directory for the server's file name)")
    p.add_argument("--kind", choices=("training", "faithfulness"),
                   help="default: training for Edge Pruning jobs, else faithfulness")
    p.add_argument("--format", choices=("svg", "png"), default="svg")
    p.set_defaults(func=cmd_jobs_plot)

    datasets = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = datasets.add_parser("upload", parents=[common], help="upload a JSONL file of examples")
    p.add_argument("path")
    p.add_argument("--name", help="display name (default: the file name)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--request-id")
    p.set_defaults(func=cmd_datasets_upload)
    p = datasets.add_parser("list", parents=[common], help="list datasets")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_datasets_list)
    for action, func in (("get", cmd_datasets_get), ("delete", cmd_datasets_delete)):
        p = datasets.add_parser(action, parents=[common], help=f"{action} a dataset")
        p.add_argument("dataset")
        p.set_defaults(func=func)

    circuits = sub.add_parser("circuits", help="query, draw, export and compare circuits").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = circuits.add_parser("list", parents=[common], help="list circuits (filters combine with AND)")
    for flag in ("--model", "--task", "--dataset", "--method", "--job", "--contains-edge", "--contains-node"):
        p.add_argument(flag)
    p.add_argument("--min-edges", type=int)
    p.add_argument("--max-edges", type=int)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_circuits_list)
    p = circuits.add_parser("show", parents=[common], help="show a circuit's metrics (and draw it)")
    p.add_argument("circuit")
    p.add_argument("--svg", metavar="FILE", help="write the circuit's picture (SVG) to FILE")
    p.add_argument("--edges", type=int, default=0, metavar="N", help="list the N top-scoring edges")
    p.set_defaults(func=cmd_circuits_show)
    p = circuits.add_parser("plot", parents=[common],
                            help="draw a circuit, or plot its kept edges per layer (SVG or PNG)")
    p.add_argument("circuit")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (or a directory for the server's file name)")
    p.add_argument("--kind", choices=("drawing", "per-layer"), default="drawing")
    p.add_argument("--format", choices=("svg", "png"), default="svg")
    p.add_argument("--top-k", type=int, metavar="N",
                   help="only the N most important edges (Edge Pruning: keep probability)")
    p.add_argument("--node", action="append", metavar="NODE",
                   help="only edges touching NODE, e.g. a3.h1 or m2 (repeatable)")
    p.add_argument("--view", choices=("edges", "nodes"),
                   help="one line per edge (default) or per pair of nodes")
    p.add_argument("--layout", choices=("graphviz", "builtin"),
                   help="who lays the drawing out (default: graphviz where the server has it)")
    p.set_defaults(func=cmd_circuits_plot)
    p = circuits.add_parser("export", parents=[common], help="export a circuit to a file")
    p.add_argument("circuit")
    p.add_argument("path", help="output file (or a directory for the server's file name)")
    p.add_argument("--format", default="json",
                   help="json (default), dot, svg, png, safetensors or mib (MIB's circuit file)")
    p.set_defaults(func=cmd_circuits_export)
    p = circuits.add_parser("import", parents=[common],
                            help="store a circuit from a MIB / EAP-IG circuit file (JSON)")
    p.add_argument("file", help="the circuit file (EAP-IG's Graph.to_json)")
    p.add_argument("--model", required=True, help="the allow-listed model it belongs to")
    p.add_argument("--method", help="the method that found it (e.g. eap_ig), if known")
    p.add_argument("--task", default="", help="the task it was found on, as a label")
    p.add_argument("--request-id", help="idempotency key (default: a new one)")
    p.set_defaults(func=cmd_circuits_import)
    p = circuits.add_parser("delete", parents=[common], help="delete a circuit with its edges")
    p.add_argument("circuit", help="circuits/ID or ID")
    p.set_defaults(func=cmd_circuits_delete)
    p = circuits.add_parser("compare", parents=[common], help="shared and distinct edges of two circuits")
    p.add_argument("first")
    p.add_argument("second")
    p.set_defaults(func=cmd_circuits_compare)
    p = circuits.add_parser("evaluate", parents=[common], help="evaluate a circuit on other examples (a job)")
    p.add_argument("circuit")
    _add_data_flags(p)
    p.add_argument("--ablation")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--watch", action="store_true")
    p.set_defaults(func=cmd_circuits_evaluate)

    p = sub.add_parser("info", parents=[common], help="the server's version, models, devices and limits")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="start a server, prune IOI on smollm2-135m, compare with EAP, draw it")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICE_COMMANDS:  # argparse would eat the service's own options
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=cmd_server, json=False)
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgepruneError as error:
        if getattr(args, "json", False):
            print(json.dumps(error.to_dict()), file=sys.stderr)
        else:
            print(f"edgeprune: error: {error}", file=sys.stderr)
            for violation in error.violations[1:]:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
