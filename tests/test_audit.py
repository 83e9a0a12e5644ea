"""The Merkle audit log: hashing and proofs against a plaintext oracle, the SQL store on SQLite
and PostgreSQL, tamper detection by editing the database directly, heads, payload guard, CLI."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from confide import pki
from confide.canonical import canonical_json
from confide.db import make_engine, session_factory, session_scope
from confide.errors import AuthenticationError, ConfigurationError, Conflict, ValidationError
from consent import audit
from consent.audit import (
    EMPTY_ROOT,
    AuditLog,
    AuditSettings,
    HeadStore,
    SignedTreeHead,
    leaf_bytes,
    merkle_root,
    verify_consistency,
    verify_head,
    verify_inclusion,
    verify_log,
)
from consent.audit_storage import AuditBase

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


# ----------------------------------------------------------------------------------------------
# The plaintext oracle: RFC 6962 §2.1 written out literally over Python lists.
# ----------------------------------------------------------------------------------------------


def o_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def o_k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def o_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return o_leaf(d[0])
    k = o_k(len(d))
    return hashlib.sha256(b"\x01" + o_mth(d[:k]) + o_mth(d[k:])).digest()


def o_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = o_k(len(d))
    if m < k:
        return o_path(m, d[:k]) + [o_mth(d[k:])]
    return o_path(m - k, d[k:]) + [o_mth(d[:k])]


def o_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [o_mth(d)]
    k = o_k(n)
    if m <= k:
        return o_subproof(m, d[:k], b) + [o_mth(d[k:])]
    return o_subproof(m - k, d[k:], False) + [o_mth(d[:k])]


def o_proof(m: int, d: list[bytes]) -> list[bytes]:
    return o_subproof(m, d, True)


def data(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def _list_sub(d: list[bytes]):  # type: ignore[no-untyped-def]
    hashes = [o_leaf(x) for x in d]
    return lambda a, b: merkle_root(hashes[a:b])


# ----------------------------------------------------------------------------------------------
# Pure hashing and proofs
# ----------------------------------------------------------------------------------------------


def test_root_matches_oracle_for_every_size_up_to_70() -> None:
    for n in range(0, 71):
        d = data(n)
        assert merkle_root([o_leaf(x) for x in d]) == o_mth(d), n
    assert merkle_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_inclusion_proofs_match_oracle_and_verify() -> None:
    for n in range(1, 71):
        d = data(n)
        root = o_mth(d)
        sub = _list_sub(d)
        for m in range(n):
            path = audit._inclusion_path(m, 0, n, sub)
            assert path == o_path(m, d), (m, n)
            assert verify_inclusion(o_leaf(d[m]), m, n, path, root)
            assert not verify_inclusion(o_leaf(d[m]), (m + 1) % n, n, path, root) or n == 1
            assert not verify_inclusion(o_leaf(b"other"), m, n, path, root)
            assert not verify_inclusion(o_leaf(d[m]), n, n, path, root)  # index out of range
            if path:
                bad = list(path)
                bad[len(bad) // 2] = bytes(32)
                assert not verify_inclusion(o_leaf(d[m]), m, n, bad, root)
                assert not verify_inclusion(o_leaf(d[m]), m, n, path + [bytes(32)], root)
                assert not verify_inclusion(o_leaf(d[m]), m, n, path[:-1], root)


def test_consistency_proofs_match_oracle_and_verify() -> None:
    for n in range(1, 71):
        d = data(n)
        new_root = o_mth(d)
        sub = _list_sub(d)
        for m in range(1, n):
            path = audit._consistency_path(m, n, sub)
            assert path == o_proof(m, d), (m, n)
            old_root = o_mth(d[:m])
            assert verify_consistency(m, n, old_root, new_root, path)
            assert not verify_consistency(m, n, new_root, old_root, path)
            assert not verify_consistency(m, n, o_mth(data(m + 1)[1:]), new_root, path)
            assert not verify_consistency(m, n, old_root, o_mth(d[:-1] + [b"x"]), path)
            bad = list(path)
            bad[-1] = bytes(32)
            assert not verify_consistency(m, n, old_root, new_root, bad)
        assert verify_consistency(n, n, new_root, new_root, [])
        assert not verify_consistency(n, n, new_root, new_root, [bytes(32)])
        assert verify_consistency(0, n, EMPTY_ROOT, new_root, [])
        assert not verify_consistency(n, n - 1, new_root, new_root, [])


def test_random_large_pairs_against_oracle() -> None:
    rng = random.Random(6962)
    d = data(1500)
    sub = _list_sub(d)
    for _ in range(40):
        n = rng.randint(2, len(d))
        m = rng.randint(1, n - 1)
        assert audit._consistency_path(m, n, sub) == o_proof(m, d[:n])
        assert audit._inclusion_path(m, 0, n, sub) == o_path(m, d[:n])


def test_leaf_bytes_is_the_canonical_json_of_the_leaf() -> None:
    payload = {"b": [1, 2, {"z": None}], "a": "数据", "c": 1.5}
    pj = audit.payload_json(payload)
    got = leaf_bytes(7, "consent.granted", "2026-01-01T00:00:00.000000Z", pj)
    assert got == canonical_json(
        {"seq": 7, "kind": "consent.granted", "at": "2026-01-01T00:00:00.000000Z", "payload": payload}
    )


# ----------------------------------------------------------------------------------------------
# Payload guard
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"phone": "x"},
        {"email": "h"},
        {"identifier": "abc"},
        {"subject": {"phoneNumber": "h"}},
        {"id_card": "h"},
        {"items": [{"e-mail": "h"}]},
        {"name": "Zhang San"},
        {"ip_address": "h"},
        {"ref": "someone@example.com"},
        {"ref": "13812345678"},
        {"ref": "+8613812345678"},
        {"ref": "11010519491231002X"},
        {"when": dt.datetime(2026, 1, 1)},
        {1: "x"},
    ],
)
def test_raw_identifiers_and_non_json_are_refused(payload: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as err:
        audit.payload_json(payload)
    assert err.value.details.get("field", "").startswith("payload")


def test_pseudonymous_payloads_pass() -> None:
    ok = {"job_id": "j-1", "subject_ref": "psn:9f2c", "counts": {"allowed": 3, "withdrawn": 1},
          "digest": audit.payload_digest({"x": 1}), "job_name": "overlap", "reason": "expired",
          "batch": "202611270712080001", "hotel_id": "h-1"}
    assert json.loads(audit.payload_json(ok)) == ok
    with pytest.raises(ValidationError):
        audit.payload_json(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        audit.payload_json({"blob": "x" * (audit.MAX_PAYLOAD_BYTES + 1)})


def test_retention_setting_defaults_to_three_years_and_cannot_be_lower() -> None:
    assert AuditSettings().retention_days == 1096
    assert AuditSettings(retention_days=2000).retention_days == 2000
    with pytest.raises(Exception):
        AuditSettings(retention_days=30)


# ----------------------------------------------------------------------------------------------
# Contract tests on SQLite and PostgreSQL
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    AuditBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def brand(pki_dir: Path) -> pki.Identity:
    return pki.load_identity(pki_dir / "brand")


@pytest.fixture(scope="module")
def partner(pki_dir: Path) -> pki.Identity:
    return pki.load_identity(pki_dir / "partner")


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> dt.datetime:
        self.t += dt.timedelta(seconds=1)
        return self.t


def make_log(engine: Engine, ident: pki.Identity | None, n: int = 0) -> AuditLog:
    log = AuditLog(engine, ident, "brand", clock=Clock())
    if n:
        log.append_many([("job.step", {"job_id": f"j{i}", "i": i}) for i in range(n)], batch_size=7)
    return log


def leaf_payloads(n: int) -> list[bytes]:
    return [leaf_bytes(i, "job.step", audit.format_at(T0 + dt.timedelta(seconds=1)),
                       audit.payload_json({"job_id": f"j{i}", "i": i})) for i in range(n)]


@pytest.mark.parametrize("chunk", [4, 1024])
def test_store_roots_and_proofs_match_oracle(engine: Engine, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    # A tiny chunk drives the cached-subtree path with small logs.
    monkeypatch.setattr(audit, "CHUNK", chunk)
    log = make_log(engine, None, 70)
    d = leaf_payloads(70)
    assert log.size() == 70
    for n in range(0, 71):
        assert log.root(n) == o_mth(d[:n]), n
    rng = random.Random(chunk)
    for _ in range(25):
        n = rng.randint(2, 70)
        m = rng.randint(0, n - 1)
        p = log.inclusion_proof(m, n)
        assert p.path == o_path(m, d[:n])
        assert p.leaf_hash == o_leaf(d[m])
        assert p.verify(o_mth(d[:n]))
        if m:
            c = log.consistency_proof(m, n)
            assert c.path == o_proof(m, d[:n])
            assert c.verify(o_mth(d[:m]), o_mth(d[:n]))
    with pytest.raises(ValidationError):
        log.root(71)
    with pytest.raises(ValidationError):
        log.inclusion_proof(70, 70)


def test_append_returns_contiguous_seqs_and_entries_round_trip(engine: Engine) -> None:
    log = make_log(engine, None)
    assert log.size() == 0 and log.root() == EMPTY_ROOT
    assert [log.append("consent.granted", {"event_ref": f"e{i}"}) for i in range(3)] == [0, 1, 2]
    assert log.append_many([("consent.import", {"row": i}) for i in range(10)], batch_size=4) == list(range(3, 13))
    e = log.entry(4)
    assert (e.seq, e.kind, e.payload) == (4, "consent.import", {"row": 1})
    with pytest.raises(ValidationError):
        log.append("Bad Kind", {})
    with pytest.raises(ValidationError):
        log.append("ok", {"email": "x"})
    assert log.size() == 13


def test_append_inside_caller_transaction_commits_or_rolls_back_with_it(engine: Engine) -> None:
    log = make_log(engine, None, 2)
    factory = session_factory(engine)
    with pytest.raises(RuntimeError):
        with session_scope(factory) as s:
            assert log.append("step.started", {"job_id": "j"}, session=s) == 2
            raise RuntimeError("job failed")
    assert log.size() == 2
    with session_scope(factory) as s:
        assert log.append("step.started", {"job_id": "j"}, session=s) == 2
        assert log.append_many([("x.y", {"i": 1}), ("x.y", {"i": 2})], session=s) == [3, 4]
    assert log.append("step.done", {"job_id": "j"}) == 5
    # The log can also be built from a sessionmaker, as the node does.
    assert AuditLog(factory, None, "brand").size() == 6
    report = verify_log(log, [], "00" * 32)
    assert report.ok and "WARNING: no signed head" in report.summary()


def test_signed_heads_round_trip_and_bad_signatures_are_rejected(
    engine: Engine, brand: pki.Identity, partner: pki.Identity
) -> None:
    log = make_log(engine, brand, 5)
    head = log.sign_head()
    assert (head.log, head.size, head.signer) == ("brand", 5, "brand")
    assert head.root == log.root().hex()
    assert verify_head(head, brand.public_key)
    assert verify_head(head, pki.raw_public(brand.public_key).hex())
    assert not verify_head(head, partner.public_key)
    back = SignedTreeHead.from_dict(json.loads(json.dumps(head.to_dict())))
    assert back == head
    forged = SignedTreeHead.from_dict(head.to_dict() | {"size": 6})
    assert not verify_head(forged, brand.public_key)
    assert log.heads() == [head]
    for field, value in (("size", -1), ("root", "xyz"), ("signature", "00"), ("version", 9), ("log", 3)):
        with pytest.raises(ValidationError):
            SignedTreeHead.from_dict(head.to_dict() | {field: value})
    with pytest.raises(ConfigurationError):
        make_log(engine, None).sign_head()
    report = verify_log(log, [forged, head], brand.public_key)
    assert not report.ok and [p.kind for p in report.problems] == ["bad_signature"]
    report = verify_log(log, [head], partner.public_key)
    assert [p.kind for p in report.problems] == ["bad_signature"]


def test_verify_accepts_an_untouched_log_against_many_heads(engine: Engine, brand: pki.Identity) -> None:
    log = make_log(engine, brand)
    heads = [log.sign_head()]
    for i in range(40):
        log.append("step.started", {"job_id": f"j{i}"})
        if i % 9 == 0:
            heads.append(log.sign_head())
    heads.append(log.sign_head())
    report = verify_log(log, heads, brand.public_key)
    assert report.ok, report.summary()
    assert (report.size, report.heads_verified, report.first_bad_seq) == (40, len(heads), None)
    # Each older head is provably a prefix of the newest one.
    new = heads[-1]
    for h in heads[:-1]:
        proof = log.consistency_proof(h.size, new.size)
        assert verify_consistency(h.size, new.size, h.root_bytes, new.root_bytes, proof.path)


# -- tampering by editing the database directly ------------------------------------------------


def tampered(engine: Engine, brand: pki.Identity, sql: list[str], n: int = 30) -> tuple[AuditLog, list[SignedTreeHead]]:
    log = make_log(engine, brand, n // 2)
    heads = [log.sign_head()]
    log.append_many([("job.step", {"job_id": f"k{i}"}) for i in range(n - n // 2)])
    heads.append(log.sign_head())
    assert verify_log(log, heads, brand.public_key).ok
    with engine.begin() as conn:
        for stmt in sql:
            conn.execute(text(stmt))
    return log, heads


def test_changed_payload_names_its_seq(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["UPDATE audit_leaves SET payload_json = '{\"job_id\":\"jX\",\"i\": 11}' WHERE seq = 11"])
    report = verify_log(log, heads, brand.public_key)
    assert not report.ok and report.first_bad_seq == 11
    assert report.first_problem.kind == "leaf_changed"  # type: ignore[union-attr]
    assert "seq 11" in report.summary()


def test_changed_kind_or_time_names_its_seq(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["UPDATE audit_leaves SET kind = 'job.other' WHERE seq = 20",
                                          "UPDATE audit_leaves SET at = '2025-01-01T00:00:00.000000Z' WHERE seq = 25"])
    assert verify_log(log, heads, brand.public_key).first_bad_seq == 20


def test_deleted_row_names_the_missing_seq(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["DELETE FROM audit_leaves WHERE seq = 7"])
    report = verify_log(log, heads, brand.public_key)
    assert report.first_bad_seq == 7
    assert report.first_problem.kind == "missing_entry"  # type: ignore[union-attr]


def test_deleted_and_renumbered_rows_name_the_first_changed_seq(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["DELETE FROM audit_leaves WHERE seq = 7",
                                          "UPDATE audit_leaves SET seq = seq - 1 WHERE seq > 7"])
    report = verify_log(log, heads, brand.public_key)
    assert report.first_bad_seq == 7


def test_swapped_rows_name_the_first_of_the_two(engine: Engine, brand: pki.Identity) -> None:
    # Swap entire contents (kind, at, payload and stored hash) of rows 5 and 12: a reorder.
    swap = [
        "UPDATE audit_leaves SET seq = -1 WHERE seq = 5",
        "UPDATE audit_leaves SET seq = 5 WHERE seq = 12",
        "UPDATE audit_leaves SET seq = 12 WHERE seq = -1",
    ]
    log, heads = tampered(engine, brand, swap)
    report = verify_log(log, heads, brand.public_key)
    assert report.first_bad_seq == 5
    assert {p.seq for p in report.problems if p.kind == "leaf_changed"} == {5, 12}


def test_stray_row_before_the_log_is_detected(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["UPDATE audit_leaves SET seq = -1 WHERE seq = 0"])
    report = verify_log(log, heads, brand.public_key)
    assert report.first_bad_seq == 0 and report.first_problem.kind == "unexpected_entry"  # type: ignore[union-attr]


def test_truncated_tail_is_detected(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, ["DELETE FROM audit_leaves WHERE seq >= 22"])
    report = verify_log(log, heads, brand.public_key)
    assert not report.ok and report.first_bad_seq == 22 and report.size == 22
    assert report.first_problem.kind == "truncated"  # type: ignore[union-attr]


def test_rewritten_and_resigned_history_is_detected(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, [], n=30)
    # The attacker holds the node key: rewrites entry 20 with a consistent leaf hash and signs anew.
    pj = audit.payload_json({"job_id": "forged"})
    at = log.entry(20).at
    new_hash = audit.leaf_hash(leaf_bytes(20, "job.step", at, pj))
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_leaves SET payload_json = :p, leaf_hash = :h WHERE seq = 20"),
                     {"p": pj, "h": new_hash})
        conn.execute(text("DELETE FROM audit_chunks"))
    forged_head = log.sign_head()
    assert verify_log(log, [forged_head], brand.public_key).ok  # on its own it looks fine...
    report = verify_log(log, heads + [forged_head], brand.public_key)  # ...but peers kept the old heads
    assert not report.ok
    kinds = [p.kind for p in report.problems]
    assert "root_mismatch" in kinds and "equivocation" in kinds
    mismatch = next(p for p in report.problems if p.kind == "root_mismatch")
    assert mismatch.range == (15, 29)  # after the size-15 head, which still matches
    assert "15..29" in report.summary()


def test_pruned_payloads_keep_the_log_verifiable(engine: Engine, brand: pki.Identity) -> None:
    log, heads = tampered(engine, brand, [], n=10)
    later = T0 + dt.timedelta(days=1096, hours=1)
    assert log.prune_payloads(now=later) == 10
    assert log.entry(3).payload is None
    report = verify_log(log, heads, brand.public_key, now=later)
    assert report.ok and report.pruned == 10
    # Within retention a missing payload is tampering.
    assert verify_log(log, heads, brand.public_key, now=T0).first_bad_seq == 0
    assert log.prune_payloads(now=T0) == 0


def test_head_store_keeps_peer_heads_and_refuses_equivocation(
    engine: Engine, brand: pki.Identity, partner: pki.Identity
) -> None:
    log = make_log(engine, brand, 3)
    head = log.sign_head()
    store = HeadStore(engine)
    with pytest.raises(AuthenticationError):
        store.add(head, partner.public_key)
    store.add(head, brand.public_key)
    store.add(head, brand.public_key)  # idempotent
    assert store.heads("brand") == [head] and store.latest("brand") == head
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_leaves SET leaf_hash = :h WHERE seq = 0"), {"h": bytes(32)})
        conn.execute(text("DELETE FROM audit_chunks"))
    other = log.sign_head()
    assert other.size == head.size and other.root != head.root
    with pytest.raises(Conflict):
        store.add(other, brand.public_key)
    assert store.latest("nobody") is None


def test_head_store_checks_consistency_proofs_on_receipt(engine: Engine, brand: pki.Identity) -> None:
    log = make_log(engine, brand, 5)
    store = HeadStore(engine)
    first = log.sign_head()
    store.add(first, brand.public_key, proof=log.consistency_proof(0, 5))
    log.append_many([("job.step", {"i": i}) for i in range(6)])
    second = log.sign_head()
    store.add(second, brand.public_key, proof=log.consistency_proof(5, 11))
    # The log is rewritten below the kept head; its next head cannot be proven consistent.
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_leaves SET leaf_hash = :h WHERE seq = 2"), {"h": bytes(32)})
        conn.execute(text("DELETE FROM audit_chunks"))
    log.append("job.step", {"i": 99})
    third = log.sign_head()
    with pytest.raises(Conflict):
        store.add(third, brand.public_key, proof=log.consistency_proof(11, 12))
    with pytest.raises(Conflict):  # a proof for other sizes is no proof
        store.add(third, brand.public_key, proof=log.consistency_proof(5, 12))
    assert [h.size for h in store.heads("brand")] == [5, 11]


# ----------------------------------------------------------------------------------------------
# CLI (SQLite)
# ----------------------------------------------------------------------------------------------


def run_cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from consent.audit_cli import app

    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output


def test_cli_head_verify_and_proof(tmp_path: Path, pki_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    eng = make_engine(url)
    AuditBase.metadata.create_all(eng)
    log = AuditLog(eng, None, "brand")
    log.append_many([("job.step", {"job_id": f"j{i}"}) for i in range(12)])
    heads = tmp_path / "heads.json"
    code, out = run_cli(["head", "--database-url", url, "--identity", str(pki_dir / "brand"), "--out", str(heads)])
    assert code == 0, out
    assert json.loads(out)["size"] == 12
    key = pki.raw_public(pki.load_identity(pki_dir / "brand").public_key).hex()

    code, out = run_cli(["verify", "--database-url", url, "--heads", str(heads), "--public-key", key])
    assert code == 0 and "12 entries verified" in out, out
    code, out = run_cli(["verify", "--database-url", url, "--heads", str(heads),
                         "--cert", str(pki_dir / "brand" / "cert.pem"), "--json"])
    assert code == 0 and json.loads(out)["ok"] is True, out

    code, out = run_cli(["proof", "--database-url", url, "--seq", "4"])
    doc = json.loads(out)
    assert code == 0 and doc["entry"]["payload"] == {"job_id": "j4"}
    assert audit.InclusionProof.from_dict(doc["proof"]).verify(bytes.fromhex(doc["root"]))
    code, out = run_cli(["consistency", "--database-url", url, "--old", "5"])
    doc = json.loads(out)
    assert audit.ConsistencyProof.from_dict(doc["proof"]).verify(bytes.fromhex(doc["old_root"]),
                                                                  bytes.fromhex(doc["new_root"]))

    with eng.begin() as conn:
        conn.execute(text("DELETE FROM audit_leaves WHERE seq = 9"))
    code, out = run_cli(["verify", "--database-url", url, "--heads", str(heads), "--public-key", key])
    assert code == 1 and "first bad entry: seq 9" in out, out
    code, out = run_cli(["verify", "--database-url", url, "--heads", str(heads), "--public-key", key, "--json"])
    assert code == 1 and json.loads(out)["first_bad_seq"] == 9
    code, out = run_cli(["verify", "--database-url", url, "--heads", str(heads)])
    assert code != 0
    code, out = run_cli(["prune", "--database-url", url])
    assert code == 0 and "pruned the payloads of 0 entries" in out, out
    code, out = run_cli(["prune", "--database-url", url, "--retention-days", "30"])
    assert code != 0
    eng.dispose()


def test_cli_verify_with_heads_a_peer_kept(tmp_path: Path, brand: pki.Identity) -> None:
    url, peer_url = f"sqlite:///{tmp_path / 'node.db'}", f"sqlite:///{tmp_path / 'peer.db'}"
    eng, peer = make_engine(url), make_engine(peer_url)
    AuditBase.metadata.create_all(eng)
    AuditBase.metadata.create_all(peer)
    log = AuditLog(eng, brand, "brand")
    log.append_many([("job.step", {"job_id": f"j{i}"}) for i in range(8)])
    HeadStore(peer).add(log.sign_head(), brand.public_key)
    key = pki.raw_public(brand.public_key).hex()
    code, out = run_cli(["verify", "--database-url", url, "--peer-database-url", peer_url, "--public-key", key,
                         "--log", "brand"])
    assert code == 0 and "8 entries verified against 1 signed head" in out, out
    with eng.begin() as conn:
        conn.execute(text("DELETE FROM audit_leaves WHERE seq >= 6"))
    code, out = run_cli(["verify", "--database-url", url, "--peer-database-url", peer_url, "--public-key", key,
                         "--log", "brand"])
    assert code == 1 and "seq 6" in out, out
    code, out = run_cli(["verify", "--database-url", url, "--public-key", key, "--log", "brand"])
    assert code != 0  # neither --heads nor --peer-database-url
    eng.dispose()
    peer.dispose()


def test_cli_through_the_main_entry_point(tmp_path: Path) -> None:
    from confide.cli import main

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    heads = tmp_path / "h.json"
    heads.write_text("[]")
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "verify", "--database-url", url, "--heads", str(heads), "--public-key", "00" * 32,
              "--log", "brand"])
    assert exit_.value.code == ConfigurationError.exit_code  # no audit tables in that database


def test_missing_tables_fail_fast_with_the_database_error(tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    eng = make_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    with pytest.raises(OperationalError):
        AuditLog(eng, None, "brand").append("x.y", {"i": 1})
    eng.dispose()


def test_concurrent_writers_get_contiguous_seqs(db_url: str) -> None:
    import threading

    engines = [make_engine(db_url) for _ in range(3)]
    AuditBase.metadata.create_all(engines[0])
    logs = [AuditLog(e, None, "brand") for e in engines]
    seqs: list[int] = []
    lock = threading.Lock()

    def writer(log: AuditLog, k: int) -> None:
        for i in range(20):
            if i % 5 == 4:  # some appends ride in a caller's transaction
                with session_scope(session_factory(log.engine)) as s:
                    got = log.append("job.step", {"w": k, "i": i}, session=s)
            else:
                got = log.append("job.step", {"w": k, "i": i})
            with lock:
                seqs.append(got)

    threads = [threading.Thread(target=writer, args=(log, k)) for k, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(60))
    assert verify_log(logs[0], [], "00" * 32).ok
    for e in engines:
        e.dispose()


def test_group_commit_coalesces_concurrent_appends_and_each_returns_durable(db_url: str) -> None:
    import threading

    eng = make_engine(db_url)
    AuditBase.metadata.create_all(eng)
    log = AuditLog(eng, None, "brand")
    n_threads, per_thread = 8, 40
    got: dict[tuple[int, int], int] = {}
    seen_committed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def writer(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            seq = log.append("gate.decision", {"w": k, "i": i})
            # Durable on return: another connection already sees the leaf.
            with eng.connect() as conn:
                row = conn.execute(text("SELECT payload_json FROM audit_leaves WHERE seq = :s"), {"s": seq}).first()
            with lock:
                got[(k, i)] = seq
                seen_committed.append(row is not None and json.loads(row[0]) == {"i": i, "w": k})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = n_threads * per_thread
    assert sorted(got.values()) == list(range(total)) and all(seen_committed)
    # Each thread's leaves are in its own order, and fewer transactions than appends were needed.
    for k in range(n_threads):
        mine = [got[(k, i)] for i in range(per_thread)]
        assert mine == sorted(mine)
    assert log._group.transactions < total
    assert verify_log(log, [], "00" * 32).ok
    eng.dispose()


def test_group_commit_failure_reaches_every_caller_of_the_batch(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    AuditBase.metadata.create_all(eng)
    log = AuditLog(eng, None, "brand")
    log.append("job.step", {"i": 0})
    calls: list[int] = []

    def failing(items: list) -> list[int]:  # type: ignore[type-arg]
        calls.append(len(items))
        raise Conflict("database unavailable")

    log._group._commit = failing
    with pytest.raises(Conflict, match="unavailable"):
        log.append("job.step", {"i": 1})
    assert calls == [1] and log.size() == 1  # nothing half-written, the error reached the caller
    eng.dispose()
