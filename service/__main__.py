"""``python -m edgeprune.service serve|worker [flags]`` (what `edgeprune serve|worker` runs)."""

from __future__ import annotations

import sys

from edgeprune.service.cli import serve_main, worker_main


def main(argv: list[str]) -> int:
    commands = {"serve": serve_main, "worker": worker_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m edgeprune.service {serve,worker} [flags]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
