"""Generate the Python gRPC stubs (with .pyi) next to the .proto files.

The output tree mirrors the proto packages, so `from mlmesh.loader.v1 import
loader_pb2` works once the project is installed (pyproject maps the `mlmesh`
package to proto/mlmesh). Run `make proto` after editing a .proto file;
tests/test_proto.py fails when the committed stubs drift.

The trainer imports google/longrunning/operations.proto. Its compiled form
ships with googleapis-common-protos (a grpcio dependency), so protoc and buf
get those imports as a descriptor set taken from the installed package, and
no copy of the googleapis sources lives here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("mlmesh/**/*.proto"))


def google_imports(path: Path) -> Path:
    """Write the descriptors of google/longrunning/operations.proto and its imports to `path`."""
    from google.longrunning import operations_proto_pb2
    from google.protobuf import descriptor_pb2

    descriptors = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        file.CopyToProto(descriptors.file.add())  # dependencies first, as protoc expects

    add(operations_proto_pb2.DESCRIPTOR)
    path.write_bytes(descriptors.SerializeToString())
    return path


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        imports = google_imports(Path(scratch) / "google-imports.binpb")
        _protoc(protoc, out_dir, imports)
    # Every directory on the way to a stub is a regular package.
    for stub in out_dir.glob("mlmesh/**/*_pb2.py"):
        for package_dir in [stub.parent, *stub.parent.parents]:
            if package_dir == out_dir:
                break
            (package_dir / "__init__.py").touch()


def build_image(path: Path) -> Path:
    """Compile every mlmesh .proto, with its imports, into one descriptor set (a buf image) at `path`.

    `buf lint` reads this image, because buf alone cannot resolve the google imports offline.
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        imports = google_imports(Path(scratch) / "google-imports.binpb")
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={imports}",
            f"-I{PROTO_ROOT}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={path}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed; see the messages above")
    return path


def _protoc(protoc: Any, out_dir: Path, imports: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"--descriptor_set_in={imports}",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see the messages above")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)
