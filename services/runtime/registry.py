"""A versioned model registry kept in the artifact store.

    <root>/registry/<name>.json       the current document:
                                      {"name": ..., "versions": [{version, model, metrics_report, metrics, lineage, registered_at}]}
    <root>/registry/<name>/<n>.json   the document as it was when version n was registered (never rewritten)

Versions count up from 1. The same model digest registered under the same
name again returns its existing version, so a re-run pipeline never inflates
the history. Every write goes through the store's atomic write_doc, and the
copy of revision n is written before the current document is replaced, so a
current document that is truncated, corrupt or missing while revisions exist
is detected (DATA_LOSS, never a silent reset to version 1) and can be restored
from the newest revision. Writes are serialised per process; several evaluator
replicas writing one name at the same instant are not coordinated (see docs/workflow.md, "Promotion").
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from services.runtime.errors import DataLoss, InvalidArgument, bounded
from services.runtime.store import ArtifactStore, DamagedDocument

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"model name {bounded(repr(name), 140)} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _parts(name: str) -> tuple[str, ...]:
    return ("registry", f"{name}.json")


def _revision_parts(name: str, number: int) -> tuple[str, ...]:
    return ("registry", name, f"{number}.json")


def _shape_problem(name: str, document: dict[str, Any]) -> str | None:
    """What is wrong with a decoded registry document, or None when it is usable."""
    if document.get("name") != name:
        return f"names model {str(document.get('name'))[:60]!r}, not {name!r}"
    versions = document.get("versions")
    if not isinstance(versions, list):
        return "has no list of versions"
    for index, version in enumerate(versions, start=1):
        if not isinstance(version, dict) or version.get("version") != index:
            return f"entry {index} is not version {index}"
        if not (
            isinstance(version.get("model"), dict)
            and isinstance(version["model"].get("sha256"), str)
            and isinstance(version.get("metrics_report"), dict)
            and isinstance(version.get("metrics"), dict)
            and isinstance(version.get("lineage"), dict)
            and isinstance(version.get("registered_at"), str)
        ):
            return f"version {index} is missing fields"
    return None


def _revisions(store: ArtifactStore, name: str) -> list[int]:
    numbers = []
    for path in store.fs.glob(f"{store.root_path}/registry/{name}/*.json"):
        stem = path.rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit():
            numbers.append(int(stem))
    return sorted(numbers)


def _corrupt(store: ArtifactStore, name: str, problem: str) -> DataLoss:
    revisions = _revisions(store, name)
    if revisions:
        newest = "/".join(_revision_parts(name, revisions[-1]))
        advice = (
            f"its newest saved revision is {newest} (version {revisions[-1]}); copy it over "
            f"registry/{name}.json in {store.root_url} to restore the registry"
        )
    else:
        advice = (
            f"no saved revision exists; restore registry/{name}.json in {store.root_url} from a backup, "
            "or delete it to start this name afresh"
        )
    return DataLoss(
        f"the model registry for {name!r} is damaged: registry/{name}.json {problem}; nothing was registered. {advice}"
    )


def load(store: ArtifactStore, name: str) -> dict[str, Any]:
    """The current document of `name` (empty when never registered); DataLoss when damaged."""
    try:
        document = store.load_doc(_parts(name))
    except DamagedDocument as damaged:
        raise _corrupt(store, name, damaged.reason) from None
    if document is None:
        if _revisions(store, name):
            raise _corrupt(store, name, "is missing although earlier revisions exist")
        return {"name": name, "versions": []}
    problem = _shape_problem(name, document)
    if problem is not None:
        raise _corrupt(store, name, problem)
    return document


def register(store: ArtifactStore, name: str, entry: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Add `entry` (model, metrics_report, metrics, lineage) unless its model is already there."""
    document = load(store, name)
    for existing in document["versions"]:
        if existing["model"]["sha256"] == entry["model"]["sha256"]:
            return existing, True
    version = {
        **entry,
        "name": name,
        "version": len(document["versions"]) + 1,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    document = {**document, "versions": [*document["versions"], version]}
    # The revision first: if the current document is later damaged, this copy restores it.
    store.write_doc(_revision_parts(name, version["version"]), document)
    store.write_doc(_parts(name), document)
    return version, False


def list_models(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every registered name. A damaged document never stops the listing: it is logged and
    listed as {"name", "versions": [], "damaged": <what is wrong and how to restore it>}."""
    documents = []
    for path in sorted(store.fs.glob(f"{store.root_path}/registry/*.json")):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            documents.append(load(store, name))
        except DataLoss as damaged:
            log.warning("%s", damaged)
            documents.append({"name": name, "versions": [], "damaged": str(damaged)})
    return documents
