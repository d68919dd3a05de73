"""The content-addressed store: round trips, atomic writes, digest checks, ref validation.

Unit tests drive ArtifactStore directly; the gRPC tests check that the same
failures reach a caller of a real stage with the right status and a message
that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import types
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlmesh.common.v1.common_pb2 import ArtifactRef
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client.mesh import MeshClient
from services.runtime import store as store_module
from services.runtime.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from services.runtime.formats import JSON, NPY, PARQUET, SKOPS, array_to_npy, npy_to_array
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import each_stage, expect_error

DIGEST_OF_NOTHING_STORED = "0" * 64


def local_path(ref: ArtifactRef) -> Path:
    assert ref.uri.startswith("file://"), ref.uri
    return Path(ref.uri.removeprefix("file://"))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(artifact_root: Path) -> ArtifactStore:
    return ArtifactStore(str(artifact_root))


# ---- local objects ------------------------------------------------------------------------
def test_put_get_round_trip_and_ref_shape(store: ArtifactStore, artifact_root: Path) -> None:
    data = b"\x00\x01 some parquet-ish bytes \xff"
    digest = hashlib.sha256(data).hexdigest()
    ref = store.put(data, PARQUET)

    assert ref.sha256 == digest
    assert ref.size_bytes == len(data)
    assert ref.media_type == PARQUET
    real_root = os.path.realpath(artifact_root)
    assert ref.uri == f"file://{real_root}/objects/{digest[:2]}/{digest}.parquet"
    assert local_path(ref).read_bytes() == data
    assert store.get(ref) == data
    assert store.exists(ref)


@pytest.mark.parametrize(
    ("media_type", "suffix"),
    [
        (PARQUET, ".parquet"),
        (NPY, ".npy"),
        (SKOPS, ".skops"),
        (JSON, ".json"),
        ("text/html", ".html"),
        ("application/octet-stream", ""),
    ],
)
def test_uri_suffix_follows_media_type(store: ArtifactStore, media_type: str, suffix: str) -> None:
    ref = store.put(f"payload for {media_type}".encode(), media_type)
    assert ref.uri.endswith(f"/{ref.sha256}{suffix}")
    assert store.get(ref) == f"payload for {media_type}".encode()


def test_identical_bytes_are_not_rewritten(store: ArtifactStore) -> None:
    first = store.put(b"same bytes", JSON)
    before = local_path(first).stat().st_mtime_ns
    os.utime(local_path(first), ns=(before - 10**9, before - 10**9))
    second = store.put(b"same bytes", JSON)
    assert second == first
    assert local_path(first).stat().st_mtime_ns == before - 10**9, "an intact object was rewritten"


def test_a_damaged_copy_is_replaced_by_the_next_put(store: ArtifactStore) -> None:
    ref = store.put(b"original content", NPY)
    flip_first_byte(local_path(ref))
    with pytest.raises(DataLoss):
        store.get(ref)
    assert store.put(b"original content", NPY) == ref
    assert store.get(ref) == b"original content"


def test_writes_leave_no_temporary_files(store: ArtifactStore, artifact_root: Path) -> None:
    refs = [store.put(f"object {i}".encode() * 1000, PARQUET) for i in range(5)]
    store.write_doc(("memo", "loader", "k.json"), {"a": 1})
    store.write_manifest(refs[0].sha256, {"stage": "loader", "inputs": {}})
    assert temp_files(artifact_root) == []
    files = sorted(p.name for p in artifact_root.rglob("*") if p.is_file())
    assert len(files) == 7, files


def test_crash_before_rename_leaves_nothing_under_the_final_name(
    store: ArtifactStore, artifact_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []

    def crashing_replace(src: str, dst: str) -> None:
        # The state on disk at this instant is what a power cut here would leave behind.
        calls.append((src, dst))
        assert not Path(dst).exists(), "bytes were written under the final name before the rename"
        # rename(2) is atomic within one file system: the temporary file lives in the store itself.
        assert os.stat(src).st_dev == os.stat(Path(dst).parent).st_dev, "a rename across file systems is a copy"
        assert Path(src).is_relative_to(artifact_root.resolve()), "the temporary file left the store"
        assert Path(src).name.startswith(".tmp-")
        if dst.endswith(".skops"):
            assert Path(src).read_bytes() == data, "the temporary file should hold the full payload"
        raise OSError(28, "No space left on device (simulated)")

    # A stand-in for the os module as seen by store.py only; everything but replace is real.
    fake_os = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    fake_os.path = os.path
    fake_os.replace = crashing_replace
    monkeypatch.setattr(store_module, "os", fake_os)

    data = b"half-written model" * 100
    digest = hashlib.sha256(data).hexdigest()
    final = Path(os.path.realpath(artifact_root)) / "objects" / digest[:2] / f"{digest}.skops"
    # A full disk is the caller's RESOURCE_EXHAUSTED, naming the store root.
    with pytest.raises(ResourceExhausted, match="no space left on device") as caught:
        store.put(data, SKOPS)
    assert str(artifact_root) in str(caught.value) and ".tmp-" not in str(caught.value)

    assert len(calls) == 1 and calls[0][1] == str(final)
    assert not final.exists()
    assert temp_files(artifact_root) == []

    # A document write crashing the same way leaves no half document either.
    with pytest.raises(ResourceExhausted):
        store.write_doc(("memo", "trainer", "key.json"), {"result": {}})
    assert not (artifact_root / "memo" / "trainer" / "key.json").exists()
    assert store.read_doc(("memo", "trainer", "key.json")) is None

    # Once the disk "recovers", the same put succeeds and reads back intact.
    monkeypatch.undo()
    ref = store.put(data, SKOPS)
    assert local_path(ref) == final and store.get(ref) == data
    assert temp_files(artifact_root) == []


def test_every_read_verifies_the_digest(store: ArtifactStore) -> None:
    ref = store.put(b"trust me", JSON)
    local_path(ref).write_bytes(b"trust me!")  # different size, different digest
    with pytest.raises(DataLoss) as caught:
        store.get(ref, "metrics_report")
    message = str(caught.value)
    assert "metrics_report" in message and "corrupt" in message
    assert ref.sha256 in message and hashlib.sha256(b"trust me!").hexdigest() in message
    assert "force_recompute=true" in message


def test_a_buffered_read_verifies_the_digest_and_decodes_in_place(store: ArtifactStore) -> None:
    data = array_to_npy(np.arange(1000.0))
    ref = store.put(data, NPY)
    view = store.get_buffer(ref, "x_train")
    assert bytes(view) == data
    array = npy_to_array(view, "x_train")
    assert not array.flags.owndata and not array.flags.writeable  # the read buffer itself, not a copy

    # The same length, one bit changed, in place: the read sees the tampered bytes and refuses them.
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    local_path(ref).write_bytes(bytes(tampered))
    with pytest.raises(DataLoss, match=r"x_train .* is corrupt or was replaced") as caught:
        store.get_buffer(ref, "x_train")
    assert "force_recompute=true" in str(caught.value)
    # Truncated, and emptied: never a crash, always DATA_LOSS.
    for damaged in (data[:100], b""):
        local_path(ref).write_bytes(damaged)
        with pytest.raises(DataLoss):
            store.get_buffer(ref, "x_train")
    local_path(ref).unlink()
    with pytest.raises(NotFound):
        store.get_buffer(ref, "x_train")
    # The array read before the damage is the stage's own memory: still the verified values.
    np.testing.assert_array_equal(array, np.arange(1000.0))


def test_streamed_puts_hash_what_they_write(store: ArtifactStore, artifact_root: Path) -> None:
    chunks = [b"first chunk ", memoryview(b"second chunk "), bytearray(b"third")]

    def write(sink) -> None:
        for chunk in chunks:
            sink.write(chunk)

    ref = store.put_streamed(NPY, write)
    whole = b"first chunk second chunk third"
    assert ref.sha256 == hashlib.sha256(whole).hexdigest() and ref.size_bytes == len(whole)
    assert local_path(ref).read_bytes() == whole and temp_files(artifact_root) == []

    def crash(sink) -> None:
        sink.write(b"half of it")
        raise RuntimeError("the encoder failed half way")

    with pytest.raises(RuntimeError):
        store.put_streamed(NPY, crash)
    assert temp_files(artifact_root) == [], "a failed streamed write left its temporary file"


def test_stale_temporary_files_of_killed_writers_are_removed(store: ArtifactStore, artifact_root: Path) -> None:
    store.put(b"something", JSON)
    objects = artifact_root / "objects"
    stale, fresh = objects / ".tmp-killed", objects / ".tmp-writing"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (1_000_000, 1_000_000))
    assert store.remove_stale_temporaries() == 1
    assert not stale.exists() and fresh.exists()


def test_get_of_a_missing_object_is_not_found(store: ArtifactStore) -> None:
    ref = store.put(b"soon gone", NPY)
    local_path(ref).unlink()
    assert not store.exists(ref)
    with pytest.raises(NotFound, match=r"x_train .* is not in the artifact store"):
        store.get(ref, "x_train")


@pytest.mark.parametrize(
    ("uri", "sha256", "fragment"),
    [
        ("", "a" * 64, "x.uri is required"),
        ("file:///whatever", "A" * 64, "64 lowercase hex"),
        ("file:///whatever", "abc", "64 lowercase hex"),
        ("file:///whatever", "g" * 64, "64 lowercase hex"),
        ("s3://bucket/objects/aa/x", "a" * 64, "scheme 's3'"),
        ("http://example.com/objects/aa/x", "a" * 64, "scheme 'http'"),
        ("gs://bucket/objects/aa/x", "a" * 64, "scheme 'gs'"),
        ("file:///etc/passwd", "a" * 64, "outside the store"),
        ("{root}/objects/../../etc/passwd", "a" * 64, "outside the store"),
        ("file://{root}/objects/../manifests/x.json", "a" * 64, "outside the store"),
        ("file://{root}/objects/../../../../etc/passwd", "a" * 64, "outside the store"),
        ("file://{root}/objects", "a" * 64, "outside the store"),
        ("file://{root}/objects-evil/aa/x", "a" * 64, "outside the store"),
    ],
)
def test_malformed_or_foreign_refs_are_invalid(store: ArtifactStore, uri: str, sha256: str, fragment: str) -> None:
    ref = ArtifactRef(uri=uri.format(root=store.root_path), sha256=sha256)
    with pytest.raises(InvalidArgument, match=fragment):
        store.get(ref, "x")
    assert not store.exists(ref)


def test_a_symlink_out_of_the_store_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    digest = hashlib.sha256(b"not yours").hexdigest()
    link = Path(store.root_path) / "objects" / digest[:2] / digest
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    with pytest.raises(InvalidArgument, match="outside the store"):
        store.get(ArtifactRef(uri=f"file://{link}", sha256=digest), "dataset")


# ---- documents, manifests, lineage, find_digest ------------------------------------------------
def test_damaged_documents_read_as_absent(store: ArtifactStore) -> None:
    store.write_doc(("memo", "loader", "k.json"), {"x": [1, 2]})
    assert store.read_doc(("memo", "loader", "k.json")) == {"x": [1, 2]}
    (Path(store.root_path) / "memo" / "loader" / "k.json").write_text("{not json")
    assert store.read_doc(("memo", "loader", "k.json")) is None
    assert store.read_doc(("memo", "loader", "never.json")) is None


def test_first_manifest_of_an_artifact_stays_on_record(store: ArtifactStore) -> None:
    ref = store.put(b"model", SKOPS)
    store.write_manifest(ref.sha256, {"stage": "trainer", "created_at": "first", "inputs": {}})
    store.write_manifest(ref.sha256, {"stage": "trainer", "created_at": "second", "inputs": {}})
    assert store.manifest(ref.sha256)["created_at"] == "first"


def _chain(store: ArtifactStore) -> dict[str, ArtifactRef]:
    """source -> (left, right) -> joined: a diamond with a shared ancestor."""
    refs = {name: store.put(name.encode(), JSON) for name in ("source", "left", "right", "joined")}
    d = store_module.ref_to_dict
    store.write_manifest(refs["source"].sha256, {"stage": "loader", "inputs": {}})
    store.write_manifest(refs["left"].sha256, {"stage": "preprocess", "inputs": {"dataset": d(refs["source"])}})
    store.write_manifest(refs["right"].sha256, {"stage": "features", "inputs": {"dataset": d(refs["source"])}})
    store.write_manifest(
        refs["joined"].sha256,
        {"stage": "trainer", "inputs": {"a": d(refs["left"]), "b": d(refs["right"])}},
    )
    return refs


def test_lineage_is_breadth_first_and_visits_each_artifact_once(store: ArtifactStore) -> None:
    refs = _chain(store)
    chain = store.lineage(refs["joined"].sha256)
    assert [m["stage"] for m in chain] == ["trainer", "preprocess", "features", "loader"]
    assert [m["stage"] for m in store.lineage(refs["left"].sha256)] == ["preprocess", "loader"]


def test_lineage_of_an_unknown_artifact_is_not_found(store: ArtifactStore) -> None:
    ref = store.put(b"no manifest", JSON)
    with pytest.raises(NotFound, match="no manifest"):
        store.lineage(ref.sha256)


def test_lineage_tolerates_an_input_without_manifest(store: ArtifactStore) -> None:
    orphan = store.put(b"uploaded by hand", NPY)
    out = store.put(b"derived", NPY)
    store.write_manifest(out.sha256, {"stage": "trainer", "inputs": {"x": store_module.ref_to_dict(orphan)}})
    assert [m["stage"] for m in store.lineage(out.sha256)] == ["trainer"]


def test_find_digest_by_digest_prefix_and_uri(store: ArtifactStore) -> None:
    refs = _chain(store)
    digest = refs["left"].sha256
    assert store.find_digest(digest) == digest
    assert store.find_digest(digest.upper()) == digest
    assert store.find_digest(f"  {digest[:10]} ") == digest
    assert store.find_digest(refs["left"].uri) == digest
    with pytest.raises(NotFound):
        store.find_digest(digest[:5])  # too short to be a prefix
    with pytest.raises(NotFound):
        store.find_digest("ffffffffff" if not digest.startswith("ffffffffff") else "eeeeeeeeee")
    with pytest.raises(NotFound):
        store.find_digest("not-a-digest")


def test_find_digest_refuses_an_ambiguous_prefix(store: ArtifactStore) -> None:
    for tail in ("1", "2"):
        store.write_manifest("abcdef" + tail * 58, {"stage": "loader", "inputs": {}})
    with pytest.raises(InvalidArgument, match="ambiguous"):
        store.find_digest("abcdef")
    assert store.find_digest("abcdef1") == "abcdef" + "1" * 58


# ---- fsspec memory:// root ----------------------------------------------------------------
@pytest.fixture
def memory_store() -> ArtifactStore:
    store = ArtifactStore(f"memory://mlmesh-test-{uuid.uuid4().hex}")
    yield store
    store.fs.rm(store.root_path, recursive=True)


def test_memory_root_put_get_manifest_and_lineage(memory_store: ArtifactStore) -> None:
    store = memory_store
    assert not store.is_local
    refs = _chain(store)
    for name, ref in refs.items():
        assert ref.uri.startswith(f"memory://{store.root_path}/objects/{ref.sha256[:2]}/")
        assert ref.uri.endswith(".json")
        assert store.get(ref) == name.encode()
        assert store.exists(ref)
    assert store.manifest(refs["source"].sha256) == {"stage": "loader", "inputs": {}}
    assert [m["stage"] for m in store.lineage(refs["joined"].sha256)] == ["trainer", "preprocess", "features", "loader"]
    assert store.find_digest(refs["right"].sha256[:8]) == refs["right"].sha256
    assert store.find_digest(refs["right"].uri) == refs["right"].sha256
    store.write_doc(("memo", "loader", "k.json"), {"ok": True})
    assert store.read_doc(("memo", "loader", "k.json")) == {"ok": True}


def test_memory_root_verifies_digests_and_scopes_refs(memory_store: ArtifactStore) -> None:
    store = memory_store
    ref = store.put(b"in memory", NPY)
    store.fs.pipe_file(store.resolve(ref.uri), b"in memorY")
    with pytest.raises(DataLoss, match="corrupt"):
        store.get(ref, "x_test")
    assert store.put(b"in memory", NPY) == ref  # the damaged copy is replaced
    assert store.get(ref) == b"in memory"

    missing = ArtifactRef(uri=ref.uri.replace(ref.sha256, "f" * 64), sha256="f" * 64)
    with pytest.raises(NotFound):
        store.get(missing)
    with pytest.raises(InvalidArgument, match="not in the store"):
        store.get(ArtifactRef(uri=f"file://{store.root_path}/objects/aa/x", sha256=ref.sha256))
    with pytest.raises(InvalidArgument, match="outside the store"):
        store.get(ArtifactRef(uri="memory:///another-store/objects/aa/x", sha256=ref.sha256))
    with pytest.raises(InvalidArgument, match="outside the store"):
        store.get(ArtifactRef(uri=f"memory://{store.root_path}/objects/../memo/x", sha256=ref.sha256))


# ---- the same failures over gRPC ------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess")
async def test_tampered_dataset_gives_data_loss_then_force_recompute_repairs(client: MeshClient) -> None:
    loaded = await client.load(loader_pb2.LoadRequest(source="sklearn:iris"))
    flip_first_byte(local_path(loaded.dataset))

    details = await expect_error(
        client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset)),
        grpc.StatusCode.DATA_LOSS,
        "dataset",
        "corrupt",
        loaded.dataset.sha256,
        "force_recompute=true",
    )
    assert "Traceback" not in details

    # The memo sees the changed fingerprint and re-hashes, so a plain reload recomputes
    # and rewrites the bytes instead of handing out the damaged ref...
    again = await client.load(loader_pb2.LoadRequest(source="sklearn:iris"))
    assert not again.stage.cache_hit and again.dataset == loaded.dataset
    # ...and so does the advice in the message.
    repaired = await client.load(loader_pb2.LoadRequest(source="sklearn:iris", force_recompute=True))
    assert repaired.dataset == loaded.dataset and not repaired.stage.cache_hit
    prepared = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=repaired.dataset))
    assert prepared.train_rows + prepared.test_rows == prepared.rows_out > 0


def _bad_refs(settings: Settings) -> dict[str, tuple[ArtifactRef, grpc.StatusCode, str]]:
    root = settings.artifact_root
    digest = "ab" * 32
    return {
        "traversal": (
            ArtifactRef(uri=f"file://{root}/objects/../../etc/passwd", sha256=digest),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the store",
        ),
        "s3": (
            ArtifactRef(uri="s3://bucket/objects/ab/x.npy", sha256=digest),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'s3'",
        ),
        "http": (
            ArtifactRef(uri="http://169.254.169.254/latest/meta-data", sha256=digest),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'http'",
        ),
        "missing": (
            ArtifactRef(uri=f"file://{root}/objects/ab/{digest}.npy", sha256=digest),
            grpc.StatusCode.NOT_FOUND,
            "is not in the artifact store",
        ),
        "bad-sha": (
            ArtifactRef(uri=f"file://{root}/objects/ab/{digest}.npy", sha256="xyz"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sha256 must be 64 lowercase hex",
        ),
        "empty-uri": (ArtifactRef(sha256=digest), grpc.StatusCode.INVALID_ARGUMENT, "uri is required"),
    }


def _call_with_ref(client: MeshClient, stage: str, ref: ArtifactRef):
    if stage == "preprocess":
        return client.preprocess(preprocess_pb2.PreprocessRequest(dataset=ref))
    if stage == "features":
        return client.build_features(features_pb2.BuildFeaturesRequest(train=ref, test=ref))
    if stage == "trainer":
        return client.train(trainer_pb2.TrainRequest(x_train=ref, y_train=ref, model="logistic_regression"))
    return client.evaluate(evaluator_pb2.EvaluateRequest(model=ref, x_test=ref, y_test=ref))


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["traversal", "s3", "http", "missing", "bad-sha", "empty-uri"])
@pytest.mark.parametrize("stage", each_stage("preprocess", "features", "trainer", "evaluator"))
async def test_bad_refs_over_grpc(client: MeshClient, settings: Settings, stage: str, case: str) -> None:
    ref, code, fragment = _bad_refs(settings)[case]
    details = await expect_error(_call_with_ref(client, stage, ref), code, fragment)
    if case == "traversal":
        assert "root:" not in details  # nothing of /etc/passwd leaks back
    assert "Traceback" not in details
