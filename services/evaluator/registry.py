"""A versioned model registry kept in the artifact store.

    <root>/registry/<name>.json   {"name": ..., "versions": [{version, model, metrics_report, metrics, lineage, registered_at}]}

Versions count up from 1. The same model digest registered under the same
name again returns its existing version, so a re-run pipeline never inflates
the history. Writes are serialised per process; several evaluator replicas
writing one name at the same instant are not coordinated (see the README).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from services.runtime.errors import InvalidArgument
from services.runtime.store import ArtifactStore

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _parts(name: str) -> tuple[str, ...]:
    return ("registry", f"{name}.json")


def register(store: ArtifactStore, name: str, entry: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Add `entry` (model, metrics_report, metrics, lineage) unless its model is already there."""
    document = store.read_doc(_parts(name)) or {"name": name, "versions": []}
    for existing in document["versions"]:
        if existing["model"]["sha256"] == entry["model"]["sha256"]:
            return existing, True
    version = {
        **entry,
        "name": name,
        "version": len(document["versions"]) + 1,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    document["versions"].append(version)
    store.write_doc(_parts(name), document)
    return version, False


def list_models(store: ArtifactStore) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(store.fs.glob(f"{store.root_path}/registry/*.json")):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        document = store.read_doc(_parts(name))
        if document:
            documents.append(document)
    return documents
