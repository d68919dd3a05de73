"""Generate the Python gRPC stubs (with .pyi) next to the .proto files.

The output tree mirrors the proto packages, so `from mlmesh.loader.v1 import
loader_pb2` works once the project is installed (pyproject maps the `mlmesh`
package to proto/mlmesh). Run `make proto` after editing a .proto file;
tests/test_proto_stubs.py fails when the committed stubs drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("mlmesh/**/*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see the messages above")
    # Every directory on the way to a stub is a regular package.
    for stub in out_dir.glob("mlmesh/**/*_pb2.py"):
        for package_dir in [stub.parent, *stub.parent.parents]:
            if package_dir == out_dir:
                break
            (package_dir / "__init__.py").touch()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)
