"""The committed stubs match the .proto files, and the protos pass buf lint and format."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(PROTO / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.is_file())
    committed = sorted(
        p.relative_to(PROTO) for p in (PROTO / "mlmesh").rglob("*.py*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed, "stub files differ; run `make proto` and commit the result"
    drifted = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, PROTO / p, shallow=False)]
    assert not drifted, f"stubs drifted from the .proto files: {drifted}; run `make proto`"


def _buf() -> str:
    path = shutil.which("buf") or (str(BUF) if BUF.exists() else None)
    if path is None:
        pytest.fail("buf is not installed; `make test` installs it with npm (package.json)")
    return path


def test_buf_lint_passes(tmp_path: Path) -> None:
    # buf cannot fetch the googleapis module offline, so it lints protoc's image of
    # the protos (generate.py supplies google/longrunning from the installed package).
    image = tmp_path / "image.binpb"
    subprocess.run(
        [sys.executable, "-c", f"import generate; generate.build_image(__import__('pathlib').Path({str(image)!r}))"],
        cwd=PROTO,
        check=True,
    )
    result = subprocess.run([_buf(), "lint", str(image), "--path", "mlmesh"], cwd=PROTO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = subprocess.run([_buf(), "format", "--diff", "--exit-code"], cwd=PROTO, capture_output=True, text=True)
    assert result.returncode == 0, "run `buf format -w proto`:\n" + result.stdout


def test_every_choice_enum_names_exactly_its_proto_enum() -> None:
    """The options' words (services/runtime/vocabulary.py) and the wire's values, both ways:
    a value added to a .proto without its member (or the reverse) fails here."""
    from mlmesh.common.v1 import common_pb2
    from mlmesh.features.v1 import features_pb2
    from services.runtime.vocabulary import CategoricalEncoding, NumericImputation, Scaling, TaskKindChoice

    for kind, wire, prefix in (
        (Scaling, features_pb2.Scaling, "SCALING_"),
        (NumericImputation, features_pb2.NumericImputation, "NUMERIC_IMPUTATION_"),
        (CategoricalEncoding, features_pb2.CategoricalEncoding, "CATEGORICAL_ENCODING_"),
        (TaskKindChoice, common_pb2.TaskKind, "TASK_KIND_"),
    ):
        named = {value.name.removeprefix(prefix) for value in wire.DESCRIPTOR.values} - {"UNSPECIFIED"}
        assert {m.name for m in kind} - {"AUTO", "INFERRED"} == named, kind
        # Each member converts to a distinct wire value, and back to itself.
        assert len({m.to_proto() for m in kind}) == len(kind), kind
        if kind is not TaskKindChoice:
            assert all(kind.from_proto(m.to_proto(), "field") is m for m in kind), kind
    assert CategoricalEncoding.AUTO.to_proto() == features_pb2.CATEGORICAL_ENCODING_UNSPECIFIED
    assert TaskKindChoice.INFERRED.to_proto() == common_pb2.TASK_KIND_UNSPECIFIED
    assert Scaling.from_proto(features_pb2.SCALING_UNSPECIFIED, "scaling") is Scaling.STANDARD
