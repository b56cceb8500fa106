"""The model pool: names, leases, single-flight loads, the memory budget, idle timers.

Everything here runs on the event loop; only the pool changes a model's state. MLX work (loading, freeing)
goes to the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import mlx.core as mx

from mlxpool.clock import Clock, LoopClock
from mlxpool.config import Kind, ModelSpec, ServerSettings, Settings, human_bytes
from mlxpool.engines import Engine, Loader, load_engine
from mlxpool.errors import (
    MemoryBudgetError,
    MlxpoolError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    NotDownloadedError,
    ServiceUnavailableError,
)
from mlxpool.pool import downloads, sources
from mlxpool.pool.eviction import Resident, choose_victims
from mlxpool.pool.state import ModelEntry, ModelState
from mlxpool.pool.stats import PoolStats, UnloadReason
from mlxpool.worker import Worker, release_memory

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face repo id (`org/name`): what `allow_any_model` lets a request name; never a local path."""


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        worker: Worker,
        budget: int,
        *,
        loader: Loader = load_engine,
        clock: Clock | None = None,
    ):
        self.server: ServerSettings = settings.server
        self.worker = worker
        self.budget = budget
        self.loader = loader
        self.clock = clock or LoopClock()
        self.entries = {name: ModelEntry(spec) for name, spec in settings.models.items()}
        self._names = settings.name_table()
        self._changed = asyncio.Event()
        self._preloads: list[asyncio.Task[None]] = []
        self._trimming: asyncio.Task[None] | None = None
        self.stats = PoolStats()
        """Loads, unloads, evictions and their durations, for the metrics."""

    # --- names ---------------------------------------------------------------------------------------------

    def resolve(self, name: str, kind: Kind | None = None) -> ModelEntry:
        """The entry for a model name, alias, repo id or OpenAI name, or a 404 error. With `allow_any_model`, a
        hub repo id that is not configured becomes a model of `kind` (the kind the asking route serves)."""
        key = self._names.get(name)
        if key is None and kind is not None and self.server.allow_any_model and _is_repo_id(name):
            key = self._register(ModelSpec(name=name, kind=kind, repo=name))
        if key is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist on this server; GET /v1/models lists the available models.",
                param="model",
            )
        return self.entries[key]

    def _register(self, spec: ModelSpec) -> str:
        log.info("serving %s, a %s model named by a request (allow_any_model)", spec.name, spec.kind)
        self.entries[spec.name] = ModelEntry(spec)
        self._names[spec.name] = spec.name
        return spec.name

    # --- leases --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Lease a model, loading it first if needed. A leased model is never evicted or unloaded."""
        entry = self.resolve(name)
        engine = await self._ready(entry, lease=True)
        try:
            yield engine
        finally:
            entry.leases -= 1
            entry.last_used = self.clock.now()
            if entry.leases == 0:
                self._on_idle(entry, request_ended=True)
                self._restore_budget()
                self._notify()

    async def load(self, name: str) -> ModelEntry:
        """Load a model without leasing it (admin API, preload); its idle timer starts at once."""
        entry = self.resolve(name)
        await self._ready(entry, lease=False)
        return entry

    async def wait_ready(self, name: str, interval: float) -> AsyncIterator[str]:
        """Load a model, yielding a status line every `interval` seconds until it is ready.

        For streaming routes, which send the lines as SSE comments (`: downloading NAME: 45% ...`) so clients
        waiting on a cold model do not time out. Raises what loading raises.
        """
        entry = self.resolve(name)
        loading = asyncio.ensure_future(self.load(name))
        try:
            while not (await asyncio.wait({loading}, timeout=interval))[0]:
                progress = entry.progress
                yield f"downloading {name}: {progress.line()}" if progress else f"{entry.state} {name}"
            loading.result()
        finally:
            loading.cancel()

    async def unload(self, name: str) -> ModelEntry:
        """Unload a model once its current requests finish."""
        entry = self.resolve(name)
        try:
            async with asyncio.timeout(self.server.load_timeout):
                while entry.state is not ModelState.ABSENT and entry.state is not ModelState.FAILED:
                    if entry.transition is not None:
                        await asyncio.shield(entry.transition)
                    elif entry.leases or entry.waiters:
                        await self._wait_change()
                    else:
                        await asyncio.shield(self._start_unload(entry, "requested"))
        except TimeoutError:
            raise ServiceUnavailableError(
                f"model {entry.spec.name!r} is still in use by {entry.leases} request(s) after "
                f"{self.server.load_timeout:g} s; try again later",
                retry_after=10,
            ) from None
        return entry

    # --- start and stop ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading the `preload` models in the background."""
        for entry in self.entries.values():
            if entry.spec.preload:
                self._preloads.append(asyncio.create_task(self._preload(entry)))

    @property
    def ready(self) -> bool:
        """True once every preload model is loaded."""
        return all(e.state is ModelState.READY for e in self.entries.values() if e.spec.preload)

    async def close(self) -> None:
        """Stop timers and abandon loads in flight (shutdown does not wait for a large model to finish)."""
        tasks = [*self._preloads, *(e.transition for e in self.entries.values() if e.transition is not None)]
        for task in tasks:
            task.cancel()
        for entry in self.entries.values():
            self._cancel_timer(entry)
        await asyncio.gather(*tasks, return_exceptions=True)
        # Free every engine on the worker: MLX objects must not die later on another thread.
        for entry in self.entries.values():
            engine, entry.engine, entry.state = entry.engine, None, ModelState.ABSENT
            if engine is not None:
                self.worker.remove_engine(engine)
                await self.worker.call(engine.close)

    # --- memory --------------------------------------------------------------------------------------------

    def used(self) -> int:
        """Bytes counted against the budget: loaded models, and reservations of models loading."""
        return sum(entry.footprint for entry in self.entries.values())

    # --- internals -----------------------------------------------------------------------------------------

    async def _ready(self, entry: ModelEntry, lease: bool) -> Engine:
        """Wait until the model is loaded (loading it if nobody is), then lease it if asked, in the same step.

        While a request waits here the model is not idle, so a model loaded for it cannot be evicted or expire
        before the request gets its lease.
        """
        entry.waiters += 1
        try:
            async with asyncio.timeout(self.server.load_timeout):
                engine = await self._ready_unbounded(entry)
            if lease:
                entry.leases += 1
                self._cancel_timer(entry)
            return engine
        except TimeoutError:
            raise self._timeout_error(entry) from None
        finally:
            entry.waiters -= 1
            if entry.idle:  # loaded for waiters that leased nothing (admin load, preload, timeouts)
                self._on_idle(entry, request_ended=False)
                self._notify()

    def _timeout_error(self, entry: ModelEntry) -> ServiceUnavailableError:
        waited = f"{self.server.load_timeout:g} s"
        if entry.transition is not None and entry.state is ModelState.ABSENT:
            return MemoryBudgetError(
                f"no memory for model {entry.spec.name!r} within {waited}: the models in use hold "
                f"{human_bytes(self.used())} of {human_bytes(self.budget)}",
                retry_after=10,
            )
        return ServiceUnavailableError(
            f"model {entry.spec.name!r} is not ready after {waited} (state: {entry.state}); try again shortly",
            retry_after=10,
        )

    async def _ready_unbounded(self, entry: ModelEntry) -> Engine:
        while True:
            if entry.state is ModelState.READY and entry.engine is not None:
                return entry.engine
            if entry.transition is None:
                wait = entry.retry_at - self.clock.now()
                if entry.state is ModelState.FAILED and wait > 0:
                    raise ModelLoadError(
                        f"model {entry.spec.name!r} failed to load: {entry.error}; retrying in {wait:.0f} s",
                        retry_after=wait,
                    )
                entry.transition = asyncio.create_task(self._load(entry))
            transition = entry.transition
            error = await asyncio.shield(transition)
            if isinstance(error, MemoryBudgetError):
                continue  # the load gave up waiting for memory; this request still has time to try again
            if error is not None and entry.state is not ModelState.READY:
                raise error

    async def _load(self, entry: ModelEntry) -> MlxpoolError | None:
        spec = entry.spec
        try:
            path = await self._local_dir(entry)
            # A model loaded before is expected to need what it measured then, if that was more.
            estimate = await asyncio.to_thread(sources.estimate_bytes, spec, path)  # reads safetensors headers
            entry.estimate = max(estimate, entry.measured or 0)
            await self._reserve(entry)
            log.info("loading %s (estimate %s)", spec.name, human_bytes(entry.estimate))
            started = self.clock.now()
            engine, allocated = await self.worker.run(self.loader(spec, path, self.worker))
        except (MemoryBudgetError, ModelTooLargeError) as exc:
            entry.state = ModelState.ABSENT
            return exc
        except Exception as exc:
            return await self._fail(entry, exc)
        finally:
            entry.transition = None
            self._notify()
        entry.engine, entry.measured, entry.state = engine, allocated, ModelState.READY
        entry.failures, entry.error, entry.last_used = 0, None, self.clock.now()
        self.worker.add_engine(engine)
        self.stats.loaded(spec.name, self.clock.now() - started)
        log.info("loaded %s in %.1f s, %s", spec.name, self.clock.now() - started, human_bytes(allocated))
        self._restore_budget(keep=entry)
        return None

    def _restore_budget(self, keep: ModelEntry | None = None) -> None:
        """Get back under budget (a model measured more than its estimate, or caches grew): trim the models'
        caches first, then evict idle models.

        Runs after each load and whenever a model's last lease ends, so an excess that could not be evicted at
        once (every other model in use) lasts only until a lease ends.
        """
        over = self._over_budget()
        if over <= 0:
            return
        if any(e.cache_bytes for e in self.entries.values()):
            if self._trimming is None or self._trimming.done():
                self._trimming = asyncio.create_task(self._trim_then_evict(over, keep))
            return
        self._evict_over(over, keep)

    def _over_budget(self) -> int:
        leaving = sum(e.footprint for e in self.entries.values() if e.state is ModelState.UNLOADING)
        return self.used() - leaving - self.budget

    async def _trim_then_evict(self, over: int, keep: ModelEntry | None) -> None:
        await self._trim_caches(over)
        if (over := self._over_budget()) > 0:
            self._evict_over(over, keep)

    async def _trim_caches(self, need: int) -> bool:
        """Shrink the models' caches by up to `need` bytes, least recently used model first; True if any shrank."""
        freed = 0
        for entry in sorted((e for e in self.entries.values() if e.cache_bytes), key=lambda e: e.last_used):
            before, engine = entry.cache_bytes, entry.engine
            if engine is None or not before:  # unloaded meanwhile
                continue
            target = max(0, before - (need - freed))
            await self.worker.call(lambda: _trim(entry, engine, target))  # noqa: B023 (awaited at once)
            freed += before - engine.cache_bytes
            if freed >= need:
                break
        if freed:
            log.info("trimmed %s of caches for memory", human_bytes(freed))
        return freed > 0

    def _evict_over(self, over: int, keep: ModelEntry | None) -> None:
        residents = [r for r in self._residents() if keep is None or r.name != keep.spec.name]
        victims = choose_victims(residents, over) or []
        log.warning("%s over the memory budget; evicting %s", human_bytes(over), ", ".join(victims) or "nothing yet")
        for name in victims:
            self._start_unload(self.entries[name], "evicted")

    async def _local_dir(self, entry: ModelEntry) -> Path:
        spec = entry.spec
        path = await asyncio.to_thread(sources.cached_dir, spec)
        if path is not None:
            return path
        if not spec.download:
            raise NotDownloadedError(
                f"model {spec.name!r} is not downloaded and its automatic download is off; "
                f"run: mlxpool download {spec.name}",
                retry_after=60,
            )
        entry.state = ModelState.DOWNLOADING
        entry.progress = downloads.Progress()
        reporter = asyncio.create_task(self._report_download(entry, entry.progress))
        try:
            return await asyncio.to_thread(downloads.download, spec, entry.progress)
        finally:
            reporter.cancel()
            log.info("downloading %s: %s", spec.name, entry.progress.line())
            entry.progress = None

    async def _report_download(self, entry: ModelEntry, progress: downloads.Progress) -> None:
        while True:
            await asyncio.sleep(self.server.progress_interval)
            log.info("downloading %s: %s", entry.spec.name, progress.line())

    async def _reserve(self, entry: ModelEntry) -> None:
        """Make room for `entry.estimate` bytes, evicting idle models LRU, then count them as LOADING."""
        need = entry.estimate
        if need > self.budget:
            raise ModelTooLargeError(
                f"model {entry.spec.name!r} needs about {human_bytes(need)}, more than the whole memory "
                f"budget ({human_bytes(self.budget)}); raise server.memory_budget",
                retry_after=60,
            )
        try:
            async with asyncio.timeout(self.server.load_timeout):
                while (short := need - (self.budget - self.used())) > 0:
                    if await self._trim_caches(short):
                        continue
                    victims = choose_victims(self._residents(), short)
                    if victims is None:
                        await self._wait_change()
                        continue
                    log.info("evicting %s to make room for %s", ", ".join(victims), entry.spec.name)
                    await asyncio.gather(*(self._start_unload(self.entries[v], "evicted") for v in victims))
        except TimeoutError:
            raise self._timeout_error(entry) from None
        entry.state = ModelState.LOADING

    def _residents(self) -> list[Resident]:
        return [Resident(e.spec.name, e.footprint, e.last_used, e.evictable) for e in self.entries.values()]

    async def _fail(self, entry: ModelEntry, exc: Exception) -> MlxpoolError:
        entry.state = ModelState.FAILED
        entry.failures += 1
        cooldown = min(self.server.failure_cooldown * 2 ** (entry.failures - 1), self.server.failure_cooldown_max)
        entry.retry_at = self.clock.now() + cooldown
        entry.error = str(exc) or type(exc).__name__
        self.stats.failed(entry.spec.name)
        log.error("model %s failed to load (attempt %d): %s", entry.spec.name, entry.failures, entry.error)
        await self.worker.call(release_memory)
        if isinstance(exc, MlxpoolError):  # a distinct cause (repo not found, no disk...): keep it
            exc.retry_after = cooldown
            return exc
        return ModelLoadError(f"model {entry.spec.name!r} failed to load: {entry.error}", retry_after=cooldown)

    def _start_unload(self, entry: ModelEntry, reason: UnloadReason) -> asyncio.Task[MlxpoolError | None]:
        self._cancel_timer(entry)
        entry.state = ModelState.UNLOADING
        entry.transition = asyncio.create_task(self._unload(entry, reason))
        return entry.transition

    async def _unload(self, entry: ModelEntry, reason: UnloadReason) -> MlxpoolError | None:
        engine, entry.engine = entry.engine, None
        try:
            if engine is not None:
                self.worker.remove_engine(engine)
                size = (entry.measured or 0) + engine.cache_bytes
                started = self.clock.now()
                active = await self.worker.call(lambda: _free(engine, size))
                self.stats.unloaded(entry.spec.name, reason, self.clock.now() - started)
                log.info("unloaded %s; MLX active memory now %s", entry.spec.name, human_bytes(active))
        finally:
            entry.state = ModelState.ABSENT
            entry.transition = None
            self._notify()
        return None

    def _on_idle(self, entry: ModelEntry, request_ended: bool) -> None:
        """Start the idle countdown of a model nobody is using; `ttl = 0` unloads when a request ends."""
        ttl = entry.spec.ttl
        if ttl < 0 or not entry.idle:
            return
        if ttl == 0:
            if request_ended:
                self._start_unload(entry, "idle")
            return
        self._cancel_timer(entry)
        entry.timer = self.clock.call_later(ttl, lambda: self._expire(entry))

    def _expire(self, entry: ModelEntry) -> None:
        entry.timer = None
        if entry.idle:
            log.info("unloading %s after %g s idle", entry.spec.name, entry.spec.ttl)
            self._start_unload(entry, "idle")

    def _cancel_timer(self, entry: ModelEntry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    async def _preload(self, entry: ModelEntry) -> None:
        try:
            await self._ready(entry, lease=False)
        except MlxpoolError as exc:
            log.error("preload of %s failed: %s", entry.spec.name, exc.message)

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        """Wake everything waiting for a lease to end or a transition to finish."""
        self._changed.set()
        self._changed = asyncio.Event()


def _trim(entry: ModelEntry, engine: Engine, max_bytes: int) -> None:
    """Trim `engine`'s cache, unless its unload has begun (worker only: the worker runs the newest job first, so an
    unload asked for after this trim may already have closed the engine)."""
    if entry.engine is engine:
        engine.trim_cache(max_bytes)


def _free(engine: Engine, size: int) -> int:
    """Close an engine and release its memory (worker only)."""
    before = mx.get_active_memory()
    engine.close()
    return release_memory(target=before - size)


def _is_repo_id(name: str) -> bool:
    return REPO_ID.fullmatch(name) is not None and ".." not in name
