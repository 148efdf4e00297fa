"""edgeprune.service: the gRPC API server, its job workers, progress streams, metrics, health.

Layers: servicers (protocol only) -> handlers (transport-free logic) -> storage;
workers (`worker.py`, separate processes) -> runner (engine calls) -> engine. Entry points:
`edgeprune.service.cli.serve_main` / `worker_main`; in-process: `server.create_server(config)`.
Nothing is imported here, so `import edgeprune.service` stays cheap.
"""
