"""`make bench`: run every bench/bench_*.py module's ``main()`` in turn.

Each benchmark prints JSON lines (one object per measurement) and may write a table under
bench/results/. Pass module names to run a subset: ``python -m bench forward storage``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    wanted = [f"bench_{a}" if not a.startswith("bench_") else a for a in argv]
    failed = 0
    for name in names:
        if wanted and name not in wanted:
            continue
        start = time.perf_counter()
        print(f"# {name}", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            failed += 1
            print(f"# {name} FAILED: {exc!r}", flush=True)
        print(f"# {name} took {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
