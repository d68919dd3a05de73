"""Checkpoints of a fit in progress, kept in the artifact store next to the memo.

A fit grown in steps (a forest's trees) saves the estimator every
MLMESH_CHECKPOINT_SECONDS at a step boundary, and whenever it has to stop (the
trainer is shutting down, or the operation was cancelled). The same request on
a restarted trainer has the same cache key, finds the checkpoint and goes on
from its step. scikit-learn's warm start grows tree i from the same seed
whatever the chunking, and `model_to_skops` writes equal models as equal bytes,
so a resumed fit stores the very bytes an uninterrupted one would.

Layout: checkpoints/trainer/<cache key>/state.skops, and state.json naming its
sha256, step and total. The state is written first and the pointer second,
each atomically, so a kill leaves either the old checkpoint or the new one.
Both are deleted once the final model is stored.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from services.runtime.errors import StageError, Unavailable
from services.runtime.formats import model_to_skops, skops_to_model
from services.runtime.store import ArtifactStore, sha256_hex

log = logging.getLogger(__name__)


class Preempted(Unavailable):
    """The trainer is stopping; the fit was checkpointed and resumes when the request is sent again."""


class Checkpoints:
    def __init__(self, store: ArtifactStore, cache_key: str, interval_seconds: float):
        self.store = store
        self.folder = ("checkpoints", "trainer", cache_key)
        self.interval_seconds = interval_seconds
        self.last_saved = time.monotonic()
        self.saved_steps: list[int] = []

    def load(self, expected: Any, counter: str) -> tuple[Any, int] | None:
        """(estimator, steps done) from the last checkpoint, or None to start afresh.

        A checkpoint that is damaged, or does not match the requested estimator,
        is logged and ignored: resuming is an optimisation, never a risk.
        """
        pointer = self.store.read_doc((*self.folder, "state.json"))
        if pointer is None:
            return None
        data = self.store.read_blob((*self.folder, "state.skops"))
        problem = ""
        if data is None:
            problem = "its state file is missing"
        elif sha256_hex(data) != pointer.get("sha256"):
            problem = "its state does not match the digest it was saved with"
        if not problem and data is not None:
            try:
                estimator = skops_to_model(data, "checkpoint")
            except StageError as exc:
                problem = f"it does not load ({exc})"
        if not problem:
            wanted = {k: v for k, v in expected.get_params(deep=False).items() if k not in (counter, "warm_start")}
            found = {k: v for k, v in estimator.get_params(deep=False).items() if k not in (counter, "warm_start")}
            step = pointer.get("step")
            if type(estimator) is not type(expected) or repr(found) != repr(wanted):
                problem = "it was saved for a different estimator"
            elif not isinstance(step, int) or step != estimator.get_params()[counter]:
                problem = "its step count is inconsistent"
        if problem:
            log.warning("ignoring the checkpoint in %s: %s; the fit starts afresh", "/".join(self.folder), problem)
            return None
        log.info("resuming the fit from its checkpoint at %s %d", counter, pointer["step"])
        return estimator, pointer["step"]

    def save_if_due(self, estimator: Any, step: int, total: int) -> None:
        """Save when MLMESH_CHECKPOINT_SECONDS have passed since the last save (0 turns saving off)."""
        due = self.interval_seconds > 0 and time.monotonic() - self.last_saved >= self.interval_seconds
        if due and step < total:
            self.save(estimator, step, total)

    def save(self, estimator: Any, step: int, total: int) -> None:
        data = model_to_skops(estimator)
        self.store.write_blob((*self.folder, "state.skops"), data)
        self.store.write_doc(
            (*self.folder, "state.json"),
            {"sha256": sha256_hex(data), "step": step, "total": total, "saved_at": datetime.now(UTC).isoformat()},
        )
        self.last_saved = time.monotonic()
        self.saved_steps.append(step)
        log.info("checkpoint saved at step %d of %d (%d bytes)", step, total, len(data))

    def discard(self) -> None:
        """Garbage-collect once the final model is stored."""
        self.store.remove(self.folder)
