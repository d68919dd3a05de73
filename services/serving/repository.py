"""Which version of each registered model serves, and the rollout from one to the next.

The repository is the model registry in the artifact store. By default every
registered name is served at its newest version (the registry holds only
promoted models, so that is the newest PROMOTE). A policy document in the store,
`serving/policy.json`, records what operators chose instead:

    {"models": {"churn": {"pinned": 3}, "old-model": {"unloaded": true}}}

RepositoryModelLoad with a "version" parameter pins (rollback is pinning an
older version), without one it follows the newest again; RepositoryModelUnload
stops serving a name. Every replica polls the registry and the policy, so a pin
made on one reaches all of them, and a promotion made by any pipeline is picked
up within MLMESH_SERVING_POLL_SECONDS.

A rollout loads the new version on a worker thread, verifies it (every artifact
by digest, the model and transformer through skops' allow-list), warms it with a
prediction, and only then swaps it in, in one assignment on the event loop.
Requests that already hold the old version finish on it; each response names
the version that computed it. A version that fails any check never replaces
the one being served; its reason shows in RepositoryIndex.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.runtime import registry
from services.runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StageError,
    Unavailable,
    bounded,
)
from services.runtime.stage import StageRuntime
from services.serving.batching import Batcher, Outputs
from services.serving.models import ServedVersion, load_version

log = logging.getLogger(__name__)

POLICY = ("serving", "policy.json")
# Versions other than the current one that a caller asked for by number, kept loaded (least recently used out).
MAX_EXTRA_VERSIONS = 4
READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"
# A version that failed its checks is tried again after this long (someone may have repaired it).
RETRY_FAILED_SECONDS = 60.0


@dataclass
class Slot:
    """A loaded version and the batcher its requests share."""

    served: ServedVersion
    batcher: Batcher


def parse_version(text: str) -> int | None:
    """A request's model_version: "" for the served one, else a positive whole number."""
    if text == "":
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise InvalidArgument(f"model_version {bounded(repr(text), 40)} must be a registered version number, such as 3")
    return int(text)


class Repository:
    def __init__(self, runtime: StageRuntime, metrics: Any):
        self.runtime = runtime
        self.store = runtime.store
        self.settings = runtime.settings
        self.metrics = metrics
        self.current: dict[str, Slot] = {}
        self.extra: OrderedDict[tuple[str, int], Slot] = OrderedDict()
        self.policy: dict[str, dict[str, Any]] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.problems: dict[tuple[str, int], str] = {}  # versions that failed to load, and why
        self._failed_at: dict[tuple[str, int], float] = {}  # when, so that a repaired version is tried again
        self.loading: set[str] = set()
        self._load_lock = asyncio.Lock()
        # Counts this replica's policy changes, so a poll that read the store before one never undoes it.
        self._policy_epoch = 0
        self.first_pass = asyncio.Event()

    # ---- the registry and the policy, as stored ------------------------------------------
    def _read(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        documents = {doc["name"]: doc for doc in registry.list_models(self.store) if not doc.get("damaged")}
        try:
            policy = (self.store.load_doc(POLICY) or {}).get("models", {})
        except Exception as exc:  # noqa: BLE001 - a damaged policy must not stop serving
            log.warning("serving policy %s is unreadable (%s); following the newest versions", "/".join(POLICY), exc)
            policy = {}
        return documents, policy if isinstance(policy, dict) else {}

    def _wanted(self, name: str) -> int | None:
        """The version `name` should serve now, None when it should serve none."""
        choice = self.policy.get(name) or {}
        versions = self.documents.get(name, {}).get("versions") or []
        if choice.get("unloaded") or not versions:
            return None
        pinned = choice.get("pinned")
        if isinstance(pinned, int) and 1 <= pinned <= len(versions):
            return pinned
        return int(versions[-1]["version"])

    def _entry(self, name: str, version: int) -> dict[str, Any]:
        versions = self.documents.get(name, {}).get("versions") or []
        if not 1 <= version <= len(versions):
            raise NotFound(
                f"model {name!r} has no version {version}; its versions are 1 to {len(versions)}"
                if versions
                else f"no model named {name!r} is registered; RepositoryIndex lists the models"
            )
        return dict(versions[version - 1])

    # ---- loading ------------------------------------------------------------------------
    async def _load(self, name: str, version: int) -> Slot:
        entry = self._entry(name, version)
        served: ServedVersion = await self.runtime.to_thread(load_version, self.store, name, entry)

        async def compute(parts: list[Any]) -> Outputs:
            outputs: Outputs = await self.runtime.to_thread(served.predict_rows, parts)
            return outputs

        batcher = Batcher(
            compute,
            max_rows=self.settings.serving_max_batch_rows,
            max_wait=self.settings.serving_max_batch_wait_ms / 1000,
            on_batch=self.metrics.batch_rows.observe,
        )
        return Slot(served, batcher)

    async def _roll_out(self, name: str, version: int) -> None:
        """Make `version` the one `name` serves, or leave the current one and say why."""
        self.loading.add(name)
        try:
            slot = await self._load(name, version)
        except StageError as exc:
            self.problems[(name, version)] = bounded(str(exc), 300)
            self._failed_at[(name, version)] = time.monotonic()
            self.metrics.load_failures.labels(name).inc()
            log.warning("version %d of %s was not rolled out: %s", version, name, bounded(str(exc), 300))
            raise
        finally:
            self.loading.discard(name)
        previous = self.current.get(name)
        self.current[name] = slot  # the swap: one assignment on the loop
        self.problems.pop((name, version), None)
        self.metrics.live_version.labels(name).set(version)
        if previous is None or previous.served.version != version:
            log.info(
                "serving %s version %d (model %s)%s",
                name,
                version,
                slot.served.model_sha256[:12],
                f", replacing version {previous.served.version}" if previous else "",
            )

    async def refresh(self) -> None:
        """One poll: read the registry and the policy, and roll out what changed.

        A load, pin or unload made here while the poll read the store is newer than what the poll
        read: the poll then keeps this replica's policy (the epoch tells), and every decision is
        taken again under the load lock, so a poll never undoes an operator's call."""
        epoch = self._policy_epoch
        documents, policy = await self.runtime.to_thread(self._read)
        self.documents = documents
        for name in documents:  # each model's failure count exists from 0, so increase() sees its first failure
            self.metrics.load_failures.labels(name)
        if epoch == self._policy_epoch:
            self.policy = policy
        for name in sorted(set(self.current) | set(self.documents)):
            async with self._load_lock:
                if self.runtime.stopping.is_set():
                    return
                wanted = self._wanted(name)
                slot = self.current.get(name)
                if wanted is None:
                    if slot is not None:
                        self._drop(name)
                    continue
                if (slot and slot.served.version == wanted) or self._failed_recently(name, wanted):
                    continue
                try:
                    await self._roll_out(name, wanted)
                except StageError:  # recorded in problems; RepositoryIndex shows it
                    if slot is None and not (self.policy.get(name) or {}).get("pinned"):
                        await self._fall_back(name, wanted)
        self.first_pass.set()

    def _failed_recently(self, name: str, version: int) -> bool:
        """A version that failed is tried again after RETRY_FAILED_SECONDS: its artifacts may be repaired."""
        failed = self._failed_at.get((name, version))
        return failed is not None and time.monotonic() - failed < RETRY_FAILED_SECONDS

    async def _fall_back(self, name: str, failed: int) -> None:
        """Nothing serves `name` and its newest version failed (a replica starting on a damaged
        version): serve the newest earlier version that passes every check, and say why."""
        for version in range(failed - 1, 0, -1):
            if self._failed_recently(name, version):
                continue
            with contextlib.suppress(StageError):
                await self._roll_out(name, version)
                log.warning("%s serves version %d: version %d failed its checks", name, version, failed)
                return

    async def poll(self) -> None:
        """Refresh every MLMESH_SERVING_POLL_SECONDS until the stage stops."""
        while not self.runtime.stopping.is_set():
            try:
                await self.refresh()
            except DataLoss as exc:
                log.warning("the model registry could not be read: %s", bounded(str(exc), 300))
            except Exception:
                log.exception("serving could not refresh its models; retrying at the next poll")
            self.first_pass.set()
            await asyncio.sleep(self.settings.serving_poll_seconds)

    def _drop(self, name: str) -> None:
        self.current.pop(name, None)
        for key in [key for key in self.extra if key[0] == name]:
            del self.extra[key]
        self.metrics.live_version.labels(name).set(0)
        log.info("stopped serving %s", name)

    # ---- what callers ask ---------------------------------------------------------------
    def _known(self, name: str) -> None:
        registry.check_name(name)
        if name not in self.documents:
            raise NotFound(f"no model named {name!r} is registered; RepositoryIndex lists the models")

    async def slot(self, name: str, version_text: str) -> Slot:
        """The loaded version a request names, loading an older version on demand."""
        self._known(name)
        version = parse_version(version_text)
        if (self.policy.get(name) or {}).get("unloaded"):
            raise FailedPrecondition(
                f"model {name!r} is unloaded; load it with RepositoryModelLoad (mlmesh serving follow {name})"
            )
        current = self.current.get(name)
        if version is None or (current and current.served.version == version):
            if current is not None:
                return current
            wanted = self._wanted(name)
            if wanted is not None and (name, wanted) in self.problems:
                raise FailedPrecondition(f"model {name!r} has no servable version: {self.problems[(name, wanted)]}")
            raise Unavailable(f"model {name!r} is loading; retry in a moment")
        key = (name, version)
        if key in self.extra:
            self.extra.move_to_end(key)
            return self.extra[key]
        async with self._load_lock:
            if key not in self.extra:
                self.extra[key] = await self._load(name, version)
                while len(self.extra) > MAX_EXTRA_VERSIONS:
                    self.extra.popitem(last=False)
        return self.extra[key]

    def ready(self, name: str, version_text: str) -> bool:
        """Whether `name` (at `version_text`) answers now. A name nobody registered is simply not
        ready: clients ask this as a yes-or-no question. A malformed name or version is refused."""
        registry.check_name(name)
        version = parse_version(version_text)
        if name not in self.documents:
            return False
        if (self.policy.get(name) or {}).get("unloaded"):
            return False
        current = self.current.get(name)
        if version is None:
            return current is not None
        return (current is not None and current.served.version == version) or (name, version) in self.extra

    def versions(self, name: str) -> list[str]:
        return [str(v["version"]) for v in self.documents.get(name, {}).get("versions", [])]

    def index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every registered model."""
        rows = []
        for name in sorted(self.documents):
            wanted = self._wanted(name)
            slot = self.current.get(name)
            problem = self.problems.get((name, wanted)) if wanted else None
            if slot is not None:
                state, version = READY, slot.served.version
                if wanted and wanted != version:
                    reason = problem and f"version {wanted} was not rolled out: {problem}"
                    reason = reason or f"rolling out version {wanted}"
                else:
                    pinned = (self.policy.get(name) or {}).get("pinned")
                    reason = f"pinned to version {version}" if pinned == version else "follows the newest version"
            elif wanted is None:
                state, version, reason = UNLOADED, 0, "unloaded; RepositoryModelLoad serves it again"
            elif problem:
                state, version, reason = UNAVAILABLE, wanted, problem
            else:
                state, version, reason = LOADING, wanted, "loading"
            if ready_only and state != READY:
                continue
            rows.append((name, str(version) if version else "", state, reason))
        return rows

    async def _set_policy(self, name: str, choice: dict[str, Any]) -> None:
        """Record an operator's choice in the store and here (the caller holds the load lock)."""

        def write() -> None:
            stored = self.store.load_doc(POLICY) or {}
            kept = stored.get("models")
            models: dict[str, Any] = dict(kept) if isinstance(kept, dict) else {}
            models[name] = choice
            self.store.write_doc(POLICY, {"models": models})

        await self.runtime.to_thread(write)
        self.policy[name] = choice
        self._policy_epoch += 1

    async def load(self, name: str, version: int | None) -> int:
        """Serve `name` (pinned to `version`, or following the newest); returns the version now serving.
        A version that fails to load leaves the policy and the served version as they were."""
        async with self._load_lock:
            self.documents, self.policy = await self.runtime.to_thread(self._read)
            self._policy_epoch += 1
            self._known(name)
            if version is not None:
                self._entry(name, version)  # NotFound for a version that does not exist
            target = version if version is not None else int(self.documents[name]["versions"][-1]["version"])
            current = self.current.get(name)
            if current is None or current.served.version != target:
                await self._roll_out(name, target)
            await self._set_policy(name, {"pinned": version} if version is not None else {})
        return target

    async def unload(self, name: str) -> None:
        async with self._load_lock:
            self.documents, self.policy = await self.runtime.to_thread(self._read)
            self._policy_epoch += 1
            self._known(name)
            await self._set_policy(name, {"unloaded": True})
            self._drop(name)
