"""Where heavy Paillier work runs: the executor interface PSI uses, shared, not copied.

    executor.map_batches(fn, batches) -> iterator of fn(batch), in input order
    executor.workers                  -> how many batches run at once
    executor.close()

`fn` must be picklable (a module-level function or a `functools.partial` of one).

- InProcessExecutor: the calling process (tests, tiny inputs, the guest-only model).
- ProcessPoolExecutor: all cores of this machine (the default for a node).
- RayExecutor: a Ray cluster, when a node outgrows one machine. Only Paillier *public* key
  material and the node's own plaintexts travel in the task arguments (never the private key),
  but those plaintexts are the node's features: run Ray only on machines of the same node.

The implementations live in `psi.executor`; vertical training uses the same ones so an operator
configures one pool per node.
"""

from __future__ import annotations

from psi.executor import BlindingExecutor as Executor
from psi.executor import InProcessExecutor, ProcessPoolExecutor, RayExecutor

__all__ = ["Executor", "InProcessExecutor", "ProcessPoolExecutor", "RayExecutor", "default_executor"]


def default_executor(workers: int | None = None) -> Executor:
    """A process pool over `workers` cores (default: all), or in-process when `workers == 1`."""
    if workers == 1:
        return InProcessExecutor()
    return ProcessPoolExecutor(workers=workers)
