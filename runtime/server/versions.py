"""Several bundles in one service ("versions"), routed by ``model`` with a sticky split.

A ``Version`` is one loaded bundle with its own generator, batching loop and prefix cache
(KV of one model is no use to another); the scheduler (the slots: one machine's budget),
the metrics and the power hooks are the service's and shared. ``Versions`` is the registry:

- ``route(model, key)``: a ``model`` naming a serving version goes there; the service's
  public alias (``model_id``) or no ``model`` goes by the weighted split. With a session
  key (``X-Session-Id`` header, else OpenAI's ``user`` field) the split is sticky: the key's
  blake2b hash is a point in [0, 1) and the versions, in the order they were added, hold
  consecutive intervals as wide as their shares, so one key lands on one version for as
  long as the weights stay as they are; a weight change moves only the keys whose point
  lies in the moved boundaries (with two versions: exactly the share that changed hands).
  Requests without a key are spread by smooth weighted round robin (the shares exactly).
  Any other name is a 404 listing the known ones, once the service holds more than one
  version; a service of one version answers any name, as it always did.
- ``load`` opens a bundle on a thread, warms it with one short generation and only then
  makes it routable; ``retire`` stops routing new requests to a version, waits for those
  it serves (streams, voice sessions) to end, then closes its loop and lets it go.
- Every change (load, weights, retire) first records the set it changes in ``history``;
  ``rollback`` brings the last recorded set back (loading what was retired since, retiring
  what was added, restoring the weights).

Each routed request holds a ``Lease`` on its version until its response (the whole stream)
or its WebSocket has ended; ``VersionLeases`` (ASGI middleware) gives the leases back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.server.batching import BatchLoop
from moe2edge.runtime.server.config import ServerConfig, VersionSpec, speculation_config
from moe2edge.runtime.server.metrics import Metrics
from moe2edge.runtime.server.state import APIError
from moe2edge.runtime.voice.settings import describe_errors

log = logging.getLogger(__name__)
LEASES = "moe2edge.version_leases"  # the ASGI scope key of a request's leases
HISTORY = 32  # changes rollback can undo
ROUTABLE = ("serving",)
LIVE = ("loading", "serving")  # what a history entry records


@dataclass
class Version:
    """One bundle of the service. ``state``: loading -> serving -> draining -> retired
    (or loading -> failed)."""

    name: str
    bundle: str
    weight: float
    state: str = "loading"
    generator: Generator | None = None
    batching: BatchLoop | None = None
    in_flight: int = 0  # routed requests and voice sessions not yet ended
    served: int = 0  # routed so far
    error: str | None = None
    added: float = field(default_factory=time.time)
    ready: threading.Event = field(default_factory=threading.Event)  # serving or failed
    gone: threading.Event = field(default_factory=threading.Event)  # retired or failed

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bundle": self.bundle,
            "weight": self.weight,
            "state": self.state,
            "in_flight": self.in_flight,
            "served": self.served,
            "error": self.error,
        }

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bundle": self.bundle, "weight": self.weight}


class Lease:
    """A routed request's hold on its version: not freed before ``release`` (idempotent)."""

    def __init__(self, versions: Versions, version: Version) -> None:
        self.versions, self.version = versions, version
        self.started = time.perf_counter()
        self._released = False

    def release(self, status: str = "200") -> None:
        if self._released:
            return
        self._released = True
        self.versions._release(self, status)


def load_generator(config: ServerConfig, bundle: str | Path) -> Generator:
    """``bundle`` opened as the service opens every version: device, threads, speculation."""
    return Generator.from_bundle(
        bundle,
        device=config.device,
        threads=config.threads,
        speculation=speculation_config(config),
    )


def _spec(name: str, bundle: str, weight: float) -> VersionSpec:
    try:
        return VersionSpec(name=name, bundle=bundle, weight=weight)
    except ValidationError as exc:
        raise APIError(400, "bad version: " + describe_errors(exc.errors())) from None


def split_point(key: str) -> float:
    """``key``'s place in [0, 1): the same on every run and every machine."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Versions:
    """The registry; ``make_loop(generator)`` builds a version's batching loop and
    ``load(bundle)`` opens a bundle (both given by ``create_app``)."""

    def __init__(
        self,
        alias: str,
        metrics: Metrics,
        make_loop: Callable[[Generator], BatchLoop],
        load: Callable[[str], Generator],
    ) -> None:
        self.alias, self.metrics = alias, metrics
        self._make_loop, self._load = make_loop, load
        self.versions: dict[str, Version] = {}  # in the order they were added
        self.history: list[list[dict[str, Any]]] = []
        self.service: Any = None  # the ServiceState whose generator / batching: the default's
        self.default: Version | None = None
        self._cond = threading.Condition()
        self._rr: dict[str, float] = {}  # smooth weighted round robin, keyless requests

    # --- set-up ---------------------------------------------------------------------

    def add_loaded(self, name: str, bundle: str, weight: float, generator: Generator) -> Version:
        """A version already open (the main bundle, the configured ones): serving now."""
        with self._cond:
            self._check_name(name)
            version = Version(name, bundle, weight, generator=generator)
            version.batching = self._make_loop(generator)
            version.state = "serving"
            version.ready.set()
            self.versions[name] = version
        self._gauges(version)
        return version

    def attach(self, service: Any, default: Version) -> None:
        self.service, self.default = service, default

    # --- routing (event loop) ---------------------------------------------------------

    def known(self) -> list[str]:
        return [self.alias] + [v.name for v in self._routable() if v.name != self.alias]

    def route(self, model: str | None, key: str | None) -> Lease:
        """The version for a request naming ``model`` (None: the split) with session ``key``."""
        with self._cond:
            routable = self._routable()
            version = self.versions.get(model) if model and model != self.alias else None
            if version is not None and version.state not in ROUTABLE:
                raise self._not_found(model, f"version {model!r} is {version.state}")
            if version is None:
                if model and model != self.alias and len(self._live()) > 1:
                    raise self._not_found(model, f"the model {model!r} does not exist")
                version = self._split(routable, key)
            version.in_flight += 1
            version.served += 1
        self.metrics.version_in_flight.labels(version.name).set(version.in_flight)
        return Lease(self, version)

    def routed(self, state: Any, model: str | None, key: str | None, scope: dict) -> Any:
        """``state`` as the routed version's (generator, batching, ``model_id``: its name);
        the request's lease ends with its response (``VersionLeases``)."""
        lease = self.route(model, key)
        scope.setdefault(LEASES, []).append(lease)
        v = lease.version
        return dataclasses.replace(
            state, generator=v.generator, batching=v.batching, model_id=v.name, version=v
        )

    def _split(self, routable: list[Version], key: str | None) -> Version:
        weighted = [v for v in routable if v.weight > 0] or routable
        total = sum(v.weight for v in weighted)
        if len(weighted) == 1 or total <= 0:
            return weighted[0]
        if key is None:  # smooth weighted round robin: exact shares, no stickiness
            for v in weighted:
                self._rr[v.name] = self._rr.get(v.name, 0.0) + v.weight
            best = max(weighted, key=lambda v: self._rr[v.name])
            self._rr[best.name] -= total
            return best
        point, edge = split_point(key) * total, 0.0
        for v in weighted:
            edge += v.weight
            if point < edge:
                return v
        return weighted[-1]

    def _not_found(self, model: str, why: str) -> APIError:
        return APIError(
            404,
            f"{why}; this server serves: {', '.join(self.known())} (the first routes by the "
            "weighted split). List them with GET /v1/models",
            param="model",
            code="model_not_found",
        )

    def _release(self, lease: Lease, status: str) -> None:
        v = lease.version
        with self._cond:
            v.in_flight -= 1
            self._cond.notify_all()
        self.metrics.version_in_flight.labels(v.name).set(v.in_flight)
        self.metrics.version_requests.labels(v.name, status).inc()
        self.metrics.version_seconds.labels(v.name).observe(time.perf_counter() - lease.started)

    def count_tokens(self, version: Version | None, tokens: int) -> None:
        if version is not None:
            self.metrics.version_tokens.labels(version.name).inc(tokens)

    # --- changes (any thread; the admin API runs them off the event loop) --------------

    def load(self, name: str, bundle: str, weight: float, record: bool = True) -> Version:
        """Start loading ``bundle`` as ``name`` on a thread; routable once warmed."""
        spec = _spec(name, bundle, weight)
        if not (Path(spec.bundle) / "manifest.json").is_file():
            raise APIError(400, f"bundle {spec.bundle} holds no manifest.json", param="bundle")
        with self._cond:
            self._check_name(spec.name)
            if record:
                self._record()
            version = Version(spec.name, spec.bundle, spec.weight)
            self.versions.pop(spec.name, None)  # a retired one of that name
            self.versions[spec.name] = version  # (added last: others' intervals stay)
        threading.Thread(
            target=self._open, args=(version,), name=f"load-{name}", daemon=True
        ).start()
        return version

    def _open(self, version: Version) -> None:
        try:
            generator = self._load(version.bundle)
            generator.generate("hello", SamplingParams(max_new_tokens=2))  # warm-up
            batching = self._make_loop(generator)
        except Exception as exc:  # a bad bundle: say so in the version's state
            log.warning("loading version %s from %s failed: %s", version.name, version.bundle, exc)
            with self._cond:
                version.state, version.error = "failed", f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            version.ready.set()
            version.gone.set()
            return
        with self._cond:
            version.generator, version.batching = generator, batching
            if version.state == "loading":  # (not retired meanwhile)
                version.state = "serving"
            self._cond.notify_all()
        version.ready.set()
        self._gauges(version)
        log.info("version %s (%s) is serving, weight %g", version.name, version.bundle,
                 version.weight)  # fmt: skip

    def set_weights(self, weights: dict[str, float], record: bool = True) -> None:
        for name, w in weights.items():
            _spec(name, ".", w)  # the range
        with self._cond:
            unknown = sorted(n for n in weights if n not in self._live_names())
            if unknown:
                raise APIError(
                    404,
                    f"no loaded version {unknown}; loaded: {self._live_names()}",
                    param="weights",
                )
            after = {v.name: weights.get(v.name, v.weight) for v in self._routable()}
            if after and sum(after.values()) <= 0:
                raise APIError(409, "the serving versions' weights would sum to 0", param="weights")
            if record:
                self._record()
            for name, w in weights.items():
                self.versions[name].weight = float(w)
            self._rr.clear()
        for name in weights:
            self._gauges(self.versions[name])

    def retire(self, name: str, record: bool = True) -> Version:
        """Stop routing to ``name``; a thread waits for its requests, then frees it."""
        with self._cond:
            version = self.versions.get(name)
            if version is None or version.state not in LIVE:
                raise APIError(
                    404, f"no loaded version {name!r}; loaded: {self._live_names()}", param="name"
                )
            rest = [v for v in self._routable() if v is not version]
            if not rest or sum(v.weight for v in rest) <= 0:
                raise APIError(
                    409,
                    f"retiring {name!r} would leave no serving version with a weight above 0; "
                    "load one or set weights first",
                    param="name",
                )
            if record:
                self._record()
            version.state = "draining"
            if self.default is version:
                self._promote(max(rest, key=lambda v: v.weight))
        self._gauges(version)
        threading.Thread(
            target=self._drain, args=(version,), name=f"retire-{name}", daemon=True
        ).start()
        return version

    def _drain(self, version: Version) -> None:
        version.ready.wait()  # a version retired while loading finishes loading first
        with self._cond:
            while version.in_flight > 0:
                self._cond.wait()
        if version.batching is not None:
            deadline = time.monotonic() + 10  # abandoned jobs leave at the next step
            while version.batching.unfinished and time.monotonic() < deadline:
                time.sleep(0.01)
            version.batching.close()
        with self._cond:
            version.state = "retired"
            version.generator = version.batching = None
            self._cond.notify_all()
        version.gone.set()
        self._gauges(version)
        log.info("version %s retired", version.name)

    def rollback(self) -> list[dict[str, Any]]:
        """Bring back the set before the last change; returns it. Blocks until loaded."""
        with self._cond:
            if not self.history:
                raise APIError(409, "nothing to roll back: no earlier version set recorded")
            target = self.history.pop()
            live = {v.name: v for v in self._live()}
        wanted = {spec["name"]: spec for spec in target}
        loading = [
            self.load(s["name"], s["bundle"], s["weight"], record=False)
            for name, s in wanted.items()
            if name not in live
        ]
        for version in loading:
            version.ready.wait()
        failed = [v.info() for v in loading if v.state == "failed"]
        if failed:
            for version in loading:
                if version.state == "serving":
                    self.retire(version.name, record=False)
            with self._cond:
                self.history.append(target)  # still there to try again
            raise APIError(409, f"rollback could not reload {failed}; nothing else changed")
        keep = {n: s["weight"] for n, s in wanted.items() if n in live}
        if keep:
            self.set_weights(keep, record=False)
        for name in live:
            if name not in wanted:
                self.retire(name, record=False)
        return target

    # --- helpers (hold self._cond) -----------------------------------------------------

    def _routable(self) -> list[Version]:
        return [v for v in self.versions.values() if v.state in ROUTABLE]

    def _live(self) -> list[Version]:
        return [v for v in self.versions.values() if v.state in LIVE]

    def _live_names(self) -> list[str]:
        return [v.name for v in self._live()]

    def _check_name(self, name: str) -> None:
        if name == self.alias and self.versions:
            raise APIError(
                409,
                f"{name!r} is the service's alias (model_id); choose another name",
                param="name",
            )
        old = self.versions.get(name)
        if old is not None and old.state not in ("retired", "failed"):
            raise APIError(
                409, f"version {name!r} exists ({old.state}); retire it first", param="name"
            )

    def _record(self) -> None:
        self.history.append([v.spec() for v in self._live()])
        del self.history[:-HISTORY]

    def _promote(self, version: Version) -> None:
        """``version`` becomes the default (``state.generator`` / ``state.batching``)."""
        self.default = version
        if self.service is not None:
            self.service.generator, self.service.batching = version.generator, version.batching

    def _gauges(self, version: Version) -> None:
        routable = version.state in ROUTABLE
        self.metrics.version_weight.labels(version.name).set(version.weight if routable else 0)

    # --- views ---------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self._cond:
            versions = [v.info() for v in self.versions.values()]
            routable = self._routable()
            total = sum(v.weight for v in routable if v.weight > 0)
            shares = {v.name: (v.weight / total if total else 0.0) for v in routable}
            return {
                "alias": self.alias,
                "default": self.default.name,
                "versions": versions,
                "split": shares,
                "history": len(self.history),
            }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no version is loading or draining (tests, benchmarks, the CLI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(v.state in ("loading", "draining") for v in self.versions.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        for version in list(self.versions.values()):
            if version.batching is not None:
                version.batching.close()


class VersionLeases:
    """ASGI middleware: give back the version leases a request took once it has ended
    (after the last byte of a stream, or the WebSocket's close)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        leases: list[Lease] = []
        scope[LEASES] = leases
        status = "websocket" if scope["type"] == "websocket" else "500"

        async def watched(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            for lease in leases:
                lease.release(status)


def session_key(headers: Any, user: str | None = None) -> str | None:
    """The key the split sticks to: ``X-Session-Id``, else the request's ``user``."""
    return headers.get("x-session-id") or user or None
