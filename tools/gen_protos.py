"""Generate the Python stubs of protos/edgeprune/v1/*.proto into protos/gen/ (``make protos``).

Writes ``*_pb2.py`` / ``*_pb2_grpc.py`` with grpc_tools' protoc and typed ``.pyi`` stubs with
mypy-protobuf. ``--check`` generates into a temporary folder and fails (exit 1, naming the files)
when the committed stubs differ, so CI catches a .proto edited without ``make protos``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import google.api  # googleapis-common-protos: google/api/*.proto and google/rpc/*.proto
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GEN_ROOT = PROTO_ROOT / "gen"
PACKAGE_DIR = Path("edgeprune") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """The .proto sources, relative to ``protos/``."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins, writing under ``out_dir``."""
    bin_dir = Path(sys.executable).parent
    includes = [
        PROTO_ROOT,
        Path(grpc_tools.__file__).parent / "_proto",  # google/protobuf/*.proto
        Path(google.api.__path__[0]).parent.parent,  # google/api, google/rpc
    ]
    args = [
        "grpc_tools.protoc",
        *(f"-I{path}" for path in includes),
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[str]:
    """Names of the generated files in ``root/edgeprune/v1``."""
    folder = root / PACKAGE_DIR
    return {p.name for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def stale_files() -> list[str]:
    """Generated files that are missing, extra or different in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        (fresh / PACKAGE_DIR).mkdir(parents=True)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(GEN_ROOT)
        stale = sorted(want ^ have)
        for name in sorted(want & have):
            if not filecmp.cmp(fresh / PACKAGE_DIR / name, GEN_ROOT / PACKAGE_DIR / name, shallow=False):
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs (run `make protos`): {', '.join(stale)}", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    out = GEN_ROOT / PACKAGE_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in generated_files(GEN_ROOT):
        (out / name).unlink()
    generate(GEN_ROOT)
    print(f"generated {len(generated_files(GEN_ROOT))} files in {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
