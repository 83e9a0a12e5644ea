"""Where the blinding runs: one small interface, three implementations.

    executor.map_batches(fn, batches) -> iterator of fn(batch), in input order

`fn` must be picklable (a module-level function or a `functools.partial` of one). At most
`max_in_flight` batches are submitted ahead of the consumer, so memory stays bounded by
(batch size × in-flight batches) however long the input stream is.

- InProcessExecutor: the calling process (tests, tiny inputs).
- ProcessPoolExecutor: all cores of this machine (the default).
- RayExecutor: a Ray cluster (`ray.init(address=...)`), for a node that outgrows one machine.
  The job's blinding key travels to the Ray workers inside the task arguments: run Ray only on
  machines of the same node (same trust domain), never on a shared cluster.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_ROWS = 16_384


class BlindingExecutor(Protocol):
    """Runs `fn` over batches, yielding results in the order of the batches."""

    def map_batches(self, fn: Callable[[T], R], batches: Iterable[T]) -> Iterator[R]: ...

    @property
    def workers(self) -> int: ...

    def close(self) -> None: ...


class InProcessExecutor:
    def map_batches(self, fn: Callable[[T], R], batches: Iterable[T]) -> Iterator[R]:
        for b in batches:
            yield fn(b)

    @property
    def workers(self) -> int:
        return 1

    def close(self) -> None:
        pass


class ProcessPoolExecutor:
    """A pool of worker processes (default: one per core). Forkserver start method: safe with
    threads in the parent, and workers do not inherit the parent's data."""

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None) -> None:
        self._workers = workers or os.cpu_count() or 1
        self._max_in_flight = max_in_flight or 2 * self._workers
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("forkserver")
            self._pool = cf.ProcessPoolExecutor(self._workers, mp_context=ctx)
        return self._pool

    @property
    def workers(self) -> int:
        return self._workers

    def map_batches(self, fn: Callable[[T], R], batches: Iterable[T]) -> Iterator[R]:
        pool = self._get_pool()
        pending: collections.deque[cf.Future[R]] = collections.deque()
        try:
            for b in batches:
                pending.append(pool.submit(fn, b))
                if len(pending) >= self._max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "ProcessPoolExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ray_call(fn: Callable[[Any], Any], batch: Any) -> Any:
    return fn(batch)


class RayExecutor:
    """Runs the batches as Ray tasks. Connects to `address` (None: an existing `ray.init` in this
    process, else a local instance with `num_cpus`). Raises ConfigurationError if Ray is missing."""

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            from confide.errors import ConfigurationError

            raise ConfigurationError("RayExecutor needs the `ray` package") from None
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            ray.init(
                address=address,
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._owns = True
        self._remote = ray.remote(_ray_call)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self._workers = max(1, cpus)
        self._max_in_flight = max_in_flight or 2 * self._workers

    @property
    def workers(self) -> int:
        return self._workers

    def map_batches(self, fn: Callable[[T], R], batches: Iterable[T]) -> Iterator[R]:
        ray = self._ray
        fn_ref = ray.put(fn)
        pending: collections.deque[Any] = collections.deque()
        for b in batches:
            pending.append(self._remote.remote(fn_ref, b))
            if len(pending) >= self._max_in_flight:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()
            self._owns = False


def batched(seq: Any, size: int = DEFAULT_BATCH_ROWS) -> Iterator[Any]:
    """Consecutive slices of a sequence (list, bytes of fixed-width rows handled by the caller)."""
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
