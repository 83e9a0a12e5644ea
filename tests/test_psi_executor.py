"""One contract for every BlindingExecutor: same results, in order, as the plain function."""

from __future__ import annotations

import functools

import pytest

from psi import crypto
from psi.executor import InProcessExecutor, ProcessPoolExecutor, RayExecutor

DOM = crypto.domain_key("agr", "job", "phone")
KEY = bytes(range(32))
VALUES = [f"+86139{i:08d}" for i in range(600)]
BATCHES = [VALUES[i : i + 64] for i in range(0, len(VALUES), 64)]
EXPECTED = crypto.hash_and_blind(VALUES, DOM, KEY)


def _contract(ex) -> None:
    fn = functools.partial(crypto.hash_and_blind, dom=DOM, secret=KEY)
    assert b"".join(ex.map_batches(fn, iter(BATCHES))) == EXPECTED
    assert list(ex.map_batches(fn, [])) == []
    assert ex.workers >= 1


def test_in_process() -> None:
    _contract(InProcessExecutor())


def test_process_pool_bounded_in_flight() -> None:
    with ProcessPoolExecutor(workers=2, max_in_flight=2) as ex:
        _contract(ex)


def test_ray_local_instance() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ex = RayExecutor()
        _contract(ex)
        ex.close()
    finally:
        ray.shutdown()
