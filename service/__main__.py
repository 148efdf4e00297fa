"""``python -m edgeprune.service serve|worker|migrate|provision-models [flags]`` (what
`edgeprune serve|worker` runs; ``migrate`` upgrades the database schema and exits,
``provision-models`` readies the model volume and exits)."""

from __future__ import annotations

import sys

from edgeprune.service.cli import migrate_main, provision_main, serve_main, worker_main


def main(argv: list[str]) -> int:
    commands = {"serve": serve_main, "worker": worker_main, "migrate": migrate_main,
                "provision-models": provision_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m edgeprune.service {serve,worker,migrate,provision-models} [flags]",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
