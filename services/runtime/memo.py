"""The memo: what a stage has computed, by cache key, so the same request is answered again
without computing.

An entry is a JSON document in the store, memo/<stage>/<cache key>.json, holding the
response and the refs of the outputs it names. It is written last, after the outputs and
their manifests, so an entry never names an output that is not there. A recalled entry is
trusted only while its outputs are: each output must still be in the store with its bytes,
which a file system fingerprint (taken when it was last verified) vouches for without
reading it; anything else is re-hashed, and a changed or missing output makes the entry a
miss, so the work is done again.

Entries this process has seen are indexed in memory, so a hit on a local store costs a
dict lookup and a stat per file, with no JSON parsed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from mlmesh.common.v1.common_pb2 import ArtifactRef
from services.runtime.errors import bounded
from services.runtime.store import ArtifactStore, ref_to_dict

log = logging.getLogger(__name__)

ResultT = TypeVar("ResultT", bound=Message)


@dataclass(frozen=True)
class _Remembered:
    """A memo entry as the index keeps it: the response's wire bytes, and the file system
    fingerprints that vouch for the entry's document and for each of its outputs."""

    payload: bytes
    entry_fingerprint: list[Any]
    outputs: dict[str, ArtifactRef]
    fingerprints: dict[str, Any]
    # Each output's path in the store, resolved once: a hit then costs one stat per file.
    paths: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        store: ArtifactStore,
        payload: bytes,
        entry_fingerprint: list[Any],
        outputs: dict[str, ArtifactRef],
        fingerprints: dict[str, Any],
    ) -> _Remembered:
        paths = {name: store.resolve(ref.uri) for name, ref in outputs.items()}
        return cls(payload, entry_fingerprint, outputs, fingerprints, paths)


# Memo entries kept in memory per stage; older ones are read from the store again when asked.
MEMO_INDEX_ENTRIES = 4096


class Memo:
    """One stage's memo over the shared store."""

    def __init__(self, stage: str, store: ArtifactStore):
        self.stage = stage
        self.store = store
        # Entries seen by this process, newest last: a hit neither reads nor parses JSON.
        self._index_entries: OrderedDict[str, _Remembered] = OrderedDict()
        self._lock = threading.Lock()  # the loop and store threads both use the index

    async def recall(self, key: str, result_type: type[ResultT]) -> ResultT | None:
        """On a local store, a hit the index vouches for is answered on the loop: a dict
        lookup and a stat per file, no thread hop, no JSON. Anything else (an object
        store's metadata calls, reading an entry, re-hashing an output) runs in a
        thread, never on the stage's work threads, so a hit never queues behind fits."""
        if self.store.is_local:
            result = self._recall_indexed(key, result_type)
            if result is not None:
                return result
        return await asyncio.to_thread(self._recall, key, result_type)

    def _recall_indexed(self, key: str, result_type: type[ResultT]) -> ResultT | None:
        with self._lock:
            remembered = self._index_entries.get(key)
        if remembered is None:
            return None
        # The entry's document unchanged (not deleted, damaged or rewritten by another
        # replica), and each output's fingerprint as it was when last verified.
        unchanged = self.store.doc_fingerprint(self._parts(key)) == remembered.entry_fingerprint and all(
            remembered.fingerprints.get(name) is not None
            and self.store.fingerprint_at(path) == remembered.fingerprints[name]
            for name, path in remembered.paths.items()
        )
        with self._lock:
            if not unchanged:
                self._index_entries.pop(key, None)
                return None
            if key in self._index_entries:
                self._index_entries.move_to_end(key)
        result = result_type()
        result.ParseFromString(remembered.payload)
        return result

    def _index(self, key: str, remembered: _Remembered) -> None:
        with self._lock:
            self._index_entries[key] = remembered
            self._index_entries.move_to_end(key)
            while len(self._index_entries) > MEMO_INDEX_ENTRIES:
                self._index_entries.popitem(last=False)

    def _parts(self, key: str) -> tuple[str, ...]:
        return ("memo", self.stage, f"{key}.json")

    def _recall(self, key: str, result_type: type[ResultT]) -> ResultT | None:
        """The memo entry for `key`, its outputs checked; read from the store unless the index vouches for it."""
        indexed = self._recall_indexed(key, result_type)
        if indexed is not None:
            return indexed
        # Fingerprint first: if the entry changes after it, the next hit sees the change.
        entry_fingerprint = self.store.doc_fingerprint(self._parts(key))
        entry = self.store.read_doc(self._parts(key))
        if entry is None:
            return None
        try:
            outputs = {name: ArtifactRef(**ref) for name, ref in entry["outputs"].items()}
            fingerprints = entry.get("fingerprints") or {}
            if not isinstance(fingerprints, dict):
                raise TypeError("fingerprints is not an object")
            result = result_type()
            json_format.ParseDict(entry["result"], result, ignore_unknown_fields=True)
        except (KeyError, TypeError, ValueError, AttributeError, json_format.ParseError) as exc:
            # Valid JSON of the wrong shape (hand edits, an older layout): a miss, rewritten below.
            log.warning(
                "memo entry %s/%s has the wrong shape (%s); treating it as a miss and recomputing",
                self.stage,
                key[:12],
                bounded(f"{type(exc).__name__}: {exc}", 120),
            )
            return None
        # An output must be there with its bytes: a matching fingerprint (taken when it was
        # written) vouches for that without reading it; otherwise it is re-hashed.
        for name, ref in outputs.items():
            if not self.store.intact(ref, fingerprints.get(name)):
                log.warning("memo entry %s/%s: output %s is gone or changed; recomputing", self.stage, key[:12], name)
                return None
        # Outputs just re-hashed vouch for themselves from now on by their current fingerprint.
        current = {name: self.store.fingerprint(ref) for name, ref in outputs.items()}
        if entry_fingerprint is not None:
            self._index(
                key, _Remembered.of(self.store, result.SerializeToString(), entry_fingerprint, outputs, current)
            )
        return result

    def remember(
        self, key: str, result: Message, outputs: dict[str, ArtifactRef], fingerprints: dict[str, Any]
    ) -> None:
        """Write the entry for `key` (after the outputs and their manifests are stored), and index it."""
        entry = {
            "stage": self.stage,
            "cache_key": key,
            "outputs": {name: ref_to_dict(ref) for name, ref in outputs.items()},
            "fingerprints": fingerprints,
            "result": json_format.MessageToDict(result, preserving_proto_field_name=True),
        }
        self.store.write_doc(self._parts(key), entry)
        entry_fingerprint = self.store.doc_fingerprint(self._parts(key))
        if entry_fingerprint is not None:
            self._index(
                key,
                _Remembered.of(self.store, result.SerializeToString(), entry_fingerprint, dict(outputs), fingerprints),
            )
