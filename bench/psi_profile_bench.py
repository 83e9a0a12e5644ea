"""Profile job cost: the gated reveal (k_min enforced before the brand decrypts any cell).

    python bench/psi_profile_bench.py [N]        # default N = 10,000 rows per side

Both roles in one process (every message through its wire form), each with a process pool for
blinding and Paillier work; 50% overlap, 2 categorical columns x 8 skewed values + 2 numeric
columns (one sparse, so its sum is gated shut), k_min = 50, 2048-bit keys. Prints the total,
per-phase seconds per message kind, how many cells were suppressed, load and CPU.
Results: bench/RESULTS.md ("profile gated reveal").
"""
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psi.executor import ProcessPoolExecutor
from psi.inputs import PreparedItems
from psi.messages import Mode, decode, encode
from psi.profile import ProfileRequester, ProfileResponder, ProfileSpec
from psi.roles import SessionParams

def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rnd = random.Random(7)
    b = [f"p{i}" for i in range(N)]
    a = [f"p{i}" for i in range(N // 2, N // 2 + N)]  # 50% overlap
    # skewed categories so some cells fall below k_min=50
    w = [40, 25, 15, 10, 6, 2.5, 1, 0.5]
    vals = {
        "tier": rnd.choices([f"t{i}" for i in range(8)], weights=w, k=N),
        "city": rnd.choices([f"c{i}" for i in range(8)], weights=w[::-1], k=N),
        "spend": [round(rnd.uniform(0, 500), 2) if rnd.random() < 0.9 else None for _ in range(N)],
        "age": [rnd.randint(18, 80) if rnd.random() < 0.003 else None for _ in range(N)],  # ~15 present in overlap: gated
    }
    spec = ProfileSpec(categorical=("tier", "city"), numeric=("spend", "age"), k_min=50,
                       categories={"tier": tuple(f"t{i}" for i in range(8)), "city": tuple(f"c{i}" for i in range(8))})
    p = SessionParams("bench", "agr", "job", "phone", Mode.profile)
    ex_r, ex_p = ProcessPoolExecutor(), ProcessPoolExecutor()
    t0 = time.perf_counter()
    req = ProfileRequester(p, PreparedItems.from_values("phone", a), spec, ex_r)
    t1 = time.perf_counter()
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, spec, ex_p)
    t2 = time.perf_counter()
    phase = {}
    to_resp = [req.hello(), *req.round_one()]
    to_req = []
    while to_resp or to_req:
        while to_resp:
            m = decode(encode(to_resp.pop(0)))
            s = time.perf_counter(); to_req.extend(resp.handle(m)); phase["partner." + m.kind] = phase.get("partner." + m.kind, 0) + time.perf_counter() - s
        while to_req:
            m = decode(encode(to_req.pop(0)))
            s = time.perf_counter(); to_resp.extend(req.handle(m)); phase["brand." + m.kind] = phase.get("brand." + m.kind, 0) + time.perf_counter() - s
    t3 = time.perf_counter()
    ex_r.close(); ex_p.close()
    res = req.result
    print(json.dumps({"rows": N, "overlap": res.intersection_size, "seconds_total": round(t3 - t0, 1),
      "brand_init_s": round(t1 - t0, 2), "partner_init_s": round(t2 - t1, 2), "exchange_s": round(t3 - t2, 1),
      "phases_s": {k: round(v, 2) for k, v in phase.items()},
      "suppressed": sum(c.suppressed for c in res.cells), "cells": len(res.cells),
      "load": os.getloadavg(), "cpu_self_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
      "cpu_children_s": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime, 1)}))

if __name__ == '__main__':
    main()
