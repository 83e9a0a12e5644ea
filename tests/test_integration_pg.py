"""The same walk with every service on the real PostgreSQL server (production's database)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.localnet import LocalNet
from tests.test_integration import confide, setup_walk, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_registration_agreement_and_job_on_postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    urls = {"coordinator": _db(request), "brand": _db(request), "partner": _db(request)}
    with LocalNet(tmp_path, [("brand", "brand"), ("partner", "partner")], database_urls=urls,
                  coordinator_settings={"poll_interval_s": 0.1}) as net:
        net.start_all()
        setup_walk(net, tmp_path)
        out = confide("node", "job", "create", "--type", "dataset-stats", "--agreement", "coffee-2026", "--wait",
                      "--json", "--config", str(net.config("brand")))
        job = json.loads(out.stdout)
        assert job["status"] == "succeeded"
        assert job["result"]["parties"]["partner"]["datasets"][0]["rows"] == 25
        assert wait_job(net, "partner", job["id"])["status"] == "succeeded"


def _db(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database per service (the pg_url fixture gives one per test)."""
    import uuid

    from sqlalchemy import create_engine, text

    admin_url = request.getfixturevalue("pg_admin_url")
    name = f"confide_it_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    request.addfinalizer(drop)
    return admin_url.rsplit("/", 1)[0] + "/" + name
