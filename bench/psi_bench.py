"""PSI benchmark: Confide vs openmined-psi, side by side in one run, on the same phones.

    python bench/psi_bench.py --sizes 100000,1000000 [--record bench/RESULTS.md]

Each size N: two sets of N generated mainland mobile numbers with 30% overlap. Confide runs
`psi.local.run_local` (two party processes, real wire bytes, all cores per party, cardinality
mode). openmined-psi runs its cardinality protocol (client/server, GCS setup with a total
false-positive rate of 1e-9) in a child process of its own so its peak memory is measured
alone. Also prints the per-operation cost of the candidate X25519 bindings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_phones(n: int, overlap: float = 0.3, seed: int = 7) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    m = int(n * overlap)
    # distinct 11-digit numbers 13x–19x: prefix digit and 9 random digits
    total = 2 * n - m
    suffix = rng.choice(10**9, size=total, replace=False)
    second = rng.integers(3, 10, size=total)
    phones = [f"1{s}{x:09d}" for s, x in zip(second.tolist(), suffix.tolist())]
    a = phones[:n]
    b = phones[:m] + phones[n:]
    rng.shuffle(b)  # type: ignore[arg-type]
    return a, b


def _openmined_child(a: list[str], b: list[str], out: Any) -> None:
    import private_set_intersection.python as psi

    t0 = time.perf_counter()
    client = psi.client.CreateWithNewKey(False)
    server = psi.server.CreateWithNewKey(False)
    setup = server.CreateSetupMessage(1e-9, len(a), b, psi.DataStructure.GCS)
    request = client.CreateRequest(a)
    response = server.ProcessRequest(request)
    size = client.GetIntersectionSize(setup, response)
    seconds = time.perf_counter() - t0
    nbytes = (
        len(setup.SerializeToString())
        + len(request.SerializeToString())
        + len(response.SerializeToString())
    )
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put({"intersection_size": size, "seconds": seconds, "bytes": nbytes,
             "peak_rss_mb": ru.ru_maxrss / 1024.0, "cpu_s": ru.ru_utime + ru.ru_stime})


def run_openmined(a: list[str], b: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("forkserver")
    q = ctx.Queue()
    p = ctx.Process(target=_openmined_child, args=(a, b, q))
    p.start()
    res = q.get()
    p.join()
    return res


def run_confide(a: list[str], b: list[str]) -> dict[str, Any]:
    from psi.local import run_local
    from psi.messages import Mode

    r = run_local(a, b, id_type="phone", mode=Mode.cardinality)
    return {
        "cpu_s": r.left["cpu_s"] + r.right["cpu_s"],
        "phases": {"requester": r.left.get("phases_s"), "responder": r.right.get("phases_s")},
        "intersection_size": r.intersection_size,
        "seconds": r.seconds,
        "bytes": r.bytes,
        "peak_rss_mb": r.peak_rss_mb,
    }


def per_op_us(n: int = 20_000) -> dict[str, float]:
    """Microseconds per X25519 scalar multiplication for each binding, and per hash-to-curve."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    from psi import crypto

    dom = crypto.domain_key("bench", "bench", "phone")
    values = [f"+86138{i:08d}" for i in range(n)]
    pts = [crypto.hash_to_curve(v, dom) for v in values[:2000]] * (n // 2000)
    out: dict[str, float] = {}
    k = os.urandom(32)
    sk = X25519PrivateKey.from_private_bytes(k)
    t = time.perf_counter()
    for p in pts:
        sk.exchange(X25519PublicKey.from_public_bytes(p))
    out["x25519_cryptography_openssl"] = (time.perf_counter() - t) / len(pts) * 1e6
    try:
        from nacl.bindings import crypto_scalarmult

        t = time.perf_counter()
        for p in pts:
            crypto_scalarmult(k, p)
        out["x25519_pynacl_libsodium"] = (time.perf_counter() - t) / len(pts) * 1e6
    except ImportError:
        pass
    try:  # ristretto255 is only usable if the binding exposes it
        from nacl import bindings as nb

        if hasattr(nb, "crypto_scalarmult_ristretto255"):
            s = nb.crypto_core_ristretto255_scalar_random()
            rp = [nb.crypto_core_ristretto255_from_hash(hashlib.sha512(p).digest()) for p in pts]
            t = time.perf_counter()
            for p in rp:
                nb.crypto_scalarmult_ristretto255(s, p)
            out["ristretto255_pynacl"] = (time.perf_counter() - t) / len(pts) * 1e6
        else:
            out["ristretto255_pynacl"] = float("nan")  # not exported by this PyNaCl build
        s = nb.crypto_core_ed25519_scalar_reduce(os.urandom(64))
        ep = [nb.crypto_core_ed25519_from_uniform(p) for p in pts]
        t = time.perf_counter()
        for p in ep:
            nb.crypto_scalarmult_ed25519_noclamp(s, p)
        out["ed25519_noclamp_pynacl"] = (time.perf_counter() - t) / len(pts) * 1e6
    except ImportError:
        pass
    t = time.perf_counter()
    crypto.hash_and_blind(values, dom, k)
    out["confide_hash_and_blind"] = (time.perf_counter() - t) / len(values) * 1e6
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated set sizes per side")
    ap.add_argument("--record", type=Path, default=None, help="append a results section to this file")
    ap.add_argument("--skip-openmined", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    started = dt.datetime.now(dt.timezone.utc)
    lines: list[str] = []
    load_before = load()
    ops = per_op_us()
    print("per-op µs:", {k: round(v, 1) for k, v in ops.items()}, flush=True)
    rows = []
    for n in sizes:
        a, b = make_phones(n)
        print(f"n={n}: confide …", flush=True)
        c = run_confide(a, b)
        print(f"  confide    {c}", flush=True)
        if args.skip_openmined:
            o = None
        else:
            print(f"n={n}: openmined-psi …", flush=True)
            o = run_openmined(a, b)
            print(f"  openmined  {o}", flush=True)
            if o["intersection_size"] != c["intersection_size"]:
                print(f"  WARNING: sizes differ ({c['intersection_size']} vs {o['intersection_size']})")
        rows.append((n, c, o, load()))
    load_after = load()

    header = "| n per side | impl | \\|A∩B\\| | wall s | CPU s | bytes | peak RSS MB | load after |"
    lines.append(header)
    lines.append("|---|---|---|---|---|---|---|---|")
    for n, c, o, ld in rows:
        lines.append(
            f"| {n:,} | confide | {c['intersection_size']:,} | {c['seconds']:.1f} | {c['cpu_s']:.1f} | {c['bytes']:,} | {c['peak_rss_mb']:.0f} | {ld} |"
        )
        if o:
            lines.append(
                f"| {n:,} | openmined-psi 2.0.4 | {o['intersection_size']:,} | {o['seconds']:.1f} | {o['cpu_s']:.1f} | {o['bytes']:,} | {o['peak_rss_mb']:.0f} | |"
            )
            lines.append(
                f"| {n:,} | **ratio** (openmined / confide) | | **{o['seconds'] / c['seconds']:.2f}x** | {o['cpu_s'] / c['cpu_s']:.2f}x | {o['bytes'] / c['bytes']:.3f}x | {o['peak_rss_mb'] / c['peak_rss_mb']:.2f}x | |"
            )
    table = "\n".join(lines)
    print(table)
    if args.record:
        cpu = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        section = (
            f"\n## PSI cardinality: Confide vs openmined-psi — {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; "
            f"load average (1/5/15 min) before {load_before}, after {load_after} (shared machine: "
            f"other workers were running).\n"
            f"Sets: generated mainland mobiles, 30% overlap; Confide = 2 party processes × "
            f"{os.cpu_count()} blinding workers each over a pipe; openmined-psi = GCS setup, fpr 1e-9, "
            f"its own process.\n"
            f"Per-operation µs: "
            + ", ".join(f"{k} {v:.1f}" for k, v in ops.items())
            + "\n\n"
            + table
            + "\n"
        )
        with open(args.record, "a", encoding="utf-8") as f:
            f.write(section)


if __name__ == "__main__":
    main()
