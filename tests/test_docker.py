"""The docker/ deployment, checked without a Docker engine (none runs on these machines).

The compose file is parsed as data and held against the things it points at: the service
configs load as the services load them, the PKI directories it mounts are what the documented
`confide pki init` command makes, the health-check script passes against real running
services, and the image installs the project exactly as the Makefile's `install` target
(the one `make demo` and `make test` run first) does.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from sqlalchemy.engine import make_url

from confide import pki
from confide.settings import CoordinatorSettings, NodeSettings, ServiceSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"
PG_INIT = DOCKER / "postgres" / "init-databases.sh"

# compose service -> (settings class, party name = certificate CN, `confide` command group)
CONFIDE = {
    "coordinator": (CoordinatorSettings, "coordinator", "coordinator"),
    "brand-node": (NodeSettings, "brand", "node"),
    "partner-node": (NodeSettings, "partner", "node"),
}
PKI_FILES = ("cert.pem", "tls.key", "identity.key", "box.key", "ca.pem")


# --- small parsers ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR-default}`, `${VAR:-default}` and `$$`, against `env`."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3)
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if name not in env:
            raise AssertionError(f"compose variable ${{{name}}} has no default")
        return env[name]

    return _VAR.sub(sub, value)


def mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Short-syntax volumes as (source, target, mode)."""
    out = []
    for v in svc.get("volumes", []):
        assert isinstance(v, str), f"use the short volume syntax: {v!r}"
        parts = v.split(":")
        assert len(parts) in (2, 3), f"volume {v!r} is not SOURCE:TARGET[:MODE]"
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def is_bind(source: str) -> bool:
    return source.startswith(("./", "../", "/"))


def published(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port"""
    out = {}
    for p in svc.get("ports", []):
        host, container = str(p).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def makefile() -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    """(expanded variables, rules): rules map a target to (prerequisites, recipe lines)."""
    variables: dict[str, str] = {}
    raw_rules: list[tuple[str, str, list[str]]] = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t"):
            cmd = line[1:].strip()
            if raw_rules and cmd and not cmd.startswith("#"):
                raw_rules[-1][2].append(cmd)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(:=|\?=|=)\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(3).strip()
            continue
        target, sep, prereqs = line.partition(":")
        if sep:
            raw_rules.append((target.strip(), prereqs.strip(), []))

    def expand(s: str) -> str:
        for _ in range(10):
            s2 = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m.group(1), ""), s)
            if s2 == s:
                return s
            s = s2
        return s

    rules = {}
    for target, prereqs, recipe in raw_rules:
        for t in expand(target).split():
            rules[t] = (expand(prereqs).split(), [expand(c) for c in recipe])
    return {k: expand(v) for k, v in variables.items()}, rules


def make_commands(target: str) -> list[str]:
    """The commands `make TARGET` runs on a fresh checkout (prerequisites first)."""
    _, rules = makefile()
    prereqs, recipe = rules[target]
    out: list[str] = []
    for p in prereqs:
        if p in rules:
            out += make_commands(p)
    return out + recipe


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` among shell commands."""
    out = []
    for cmd in commands:
        for part in re.split(r"&&|;|\|\|", cmd):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    out.append([w for w in words[i + 2:] if w != "--quiet"])
                    break
    return out


def documented_pki_command(text: str) -> list[str]:
    # Comment markers go first, so a command continued over several `#` lines joins up.
    lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")
    found = [ln for ln in joined.splitlines() if "confide pki init" in ln]
    assert found, "no `confide pki init` command documented"
    return shlex.split(found[0])


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context drops `path` (a pattern also drops everything below a match)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        candidates = [pat]
        if pat.startswith("**/"):
            candidates.append(pat[3:])
        hit = any(
            fnmatch.fnmatchcase(pre, c) or (c.startswith("**/") and fnmatch.fnmatchcase(pre, c))
            or (pat.startswith("**/") and fnmatch.fnmatchcase(pre.rsplit("/", 1)[-1], pat[3:]))
            for pre in prefixes for c in candidates
        )
        if hit:
            result = not negate
    return result


def created_databases() -> list[str]:
    return re.findall(r"^confide_create_db\s+(\S+)\s", PG_INIT.read_text(), flags=re.M)


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("CONFIDE_NODE_", "CONFIDE_COORDINATOR_")):
            monkeypatch.delenv(k)


def settings_for(service: str, monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The service's settings as its container builds them: its YAML plus its environment."""
    svc = compose()["services"][service]
    cls = CONFIDE[service][0]
    clean_env(monkeypatch)
    for k, v in service_env(svc).items():
        monkeypatch.setenv(k, v)
    return load_settings(cls, config_source(svc))


def config_source(svc: dict[str, Any]) -> Path:
    cmd = svc["command"]
    target = cmd[cmd.index("--config") + 1]
    sources = [src for src, dst, _ in mounts(svc) if dst == target]
    assert len(sources) == 1, f"--config {target} is not mounted exactly once"
    return (DOCKER / sources[0]).resolve()


def pki_source(svc: dict[str, Any], pki_dir: Path) -> str:
    sources = [src for src, dst, _ in mounts(svc) if Path(dst) == pki_dir]
    assert len(sources) == 1, f"pki_dir {pki_dir} is not mounted exactly once"
    return sources[0]


# --- compose --------------------------------------------------------------------------------------


def test_compose_runs_postgres_coordinator_and_two_nodes_from_one_image() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", *CONFIDE}
    assert str(services["postgres"]["image"]).startswith("postgres:15")
    images = {services[s]["image"] for s in CONFIDE}
    assert len(images) == 1, f"coordinator and nodes must share one image, got {images}"
    for name in CONFIDE:
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert DOCKERFILE.is_file()


def test_each_confide_service_runs_its_own_serve_command() -> None:
    services = compose()["services"]
    for name, (_, _, group) in CONFIDE.items():
        cmd = services[name]["command"]
        assert cmd[:2] == [group, "serve"], f"{name} runs {cmd}"
        assert "--config" in cmd


def test_every_service_has_a_healthcheck() -> None:
    services = compose()["services"]
    copies_repo_to = None
    workdir = None
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = args
        if word == "COPY" and args == ". .":
            copies_repo_to = workdir
    assert copies_repo_to, "the Dockerfile does not copy the repository"
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        assert not svc["healthcheck"].get("disable"), name
        if name in CONFIDE:
            # /health is behind mutual TLS: the check is the script that presents the service's cert,
            # which the image holds because it copies the repository.
            script = next(a for a in test if a.endswith(".py"))
            assert Path(script) == Path(copies_repo_to) / HEALTHCHECK.relative_to(ROOT)
            assert HEALTHCHECK.is_file()
            config_target = svc["command"][svc["command"].index("--config") + 1]
            assert test[-1] == config_target, f"{name}: health check reads another config than the service"
    # PostgreSQL is healthy once the last database the init script creates accepts connections.
    pg_test = " ".join(services["postgres"]["healthcheck"]["test"][1:])
    assert "-h 127.0.0.1" in pg_test, "check over TCP, not the socket the init phase uses"
    assert f"-d {created_databases()[-1]}" in pg_test


def test_depends_on_waits_for_healthy_services() -> None:
    services = compose()["services"]
    want = {"coordinator": {"postgres"}, "brand-node": {"postgres", "coordinator"},
            "partner-node": {"postgres", "coordinator"}}
    for name, deps in want.items():
        dep = services[name].get("depends_on")
        assert isinstance(dep, dict), f"{name}: depends_on must use conditions"
        assert set(dep) == deps, f"{name} depends on {sorted(dep)}"
        for target, cond in dep.items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {target}: {cond}"
            assert "healthcheck" in services[target]
    assert "depends_on" not in services["postgres"]


def test_ports_are_published_and_match_the_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    host_ports = []
    for name in CONFIDE:
        settings = settings_for(name, monkeypatch)
        ports = published(services[name])
        assert settings.port in ports, f"{name} listens on {settings.port} but publishes {sorted(ports)}"
        assert settings.host == "0.0.0.0", f"{name} listens on {settings.host} only"
        host_ports.append(ports[settings.port])
    assert len(set(host_ports)) == len(host_ports), "two services publish the same host port"


def test_named_volumes_are_declared_and_hold_each_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    used: list[str] = []
    for name, svc in doc["services"].items():
        for src, _, _ in mounts(svc):
            if not is_bind(src):
                assert src in declared, f"{name} uses undeclared volume {src!r}"
                used.append(src)
    assert len(used) == len(set(used)), "a named volume is shared between services"
    assert declared == set(used), f"declared but unused volumes: {declared - set(used)}"
    pg_targets = {dst: src for src, dst, _ in mounts(doc["services"]["postgres"])}
    assert not is_bind(pg_targets["/var/lib/postgresql/data"])
    for name in CONFIDE:
        settings = settings_for(name, monkeypatch)
        by_target = {Path(dst): src for src, dst, _ in mounts(doc["services"][name])}
        src = by_target.get(Path(settings.data_dir))
        assert src is not None and not is_bind(src), f"{name}: data_dir {settings.data_dir} is not a volume"


def test_every_referenced_host_file_exists_except_the_generated_pki() -> None:
    services = compose()["services"]
    generated = {f"./pki/{party}" for _, party, _ in CONFIDE.values()}
    checked = 0
    for name, svc in services.items():
        for src, _, mode in mounts(svc):
            if not is_bind(src):
                continue
            if src in generated:
                assert mode == "ro", f"{name}: PKI must be mounted read-only"
                continue  # made by the documented command: see test_documented_pki_command...
            assert (DOCKER / src).exists(), f"{name} mounts {src}, which is not in the repository"
            checked += 1
    assert checked >= 4  # three configs and the PostgreSQL init script
    assert os.access(PG_INIT, os.X_OK), "the init script must be executable to run, not be sourced"


def test_only_each_services_own_pki_directory_is_mounted(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for src, _, _ in mounts(svc):
            norm = src.rstrip("/")
            assert norm not in ("./pki", "./pki/ca") and not norm.startswith("./pki/ca/"), (
                f"{name} mounts {src}: the CA key must stay on the host"
            )
    for name, (_, party, _) in CONFIDE.items():
        settings = settings_for(name, monkeypatch)
        assert pki_source(services[name], Path(settings.pki_dir)) == f"./pki/{party}"
    assert not any(src.startswith("./pki") for src, _, _ in mounts(services["postgres"]))


@pytest.mark.parametrize("service", list(CONFIDE))
def test_config_loads_as_the_service_loads_it(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls, party, _ = CONFIDE[service]
    settings = settings_for(service, monkeypatch)
    assert type(settings) is cls
    assert settings.name == party
    assert settings.tls is True
    url = make_url(str(settings.database_url))
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres" and url.port == 5432
    assert url.database in created_databases()
    assert url.username == url.database, "each service logs in with its own database's role"
    # The password in the URL is the one the postgres container gives that role.
    pg_env = service_env(compose()["services"]["postgres"])
    assert url.password == pg_env[f"{url.database.upper()}_DB_PASSWORD"]
    if isinstance(settings, NodeSettings):
        coord = settings_for("coordinator", monkeypatch)
        assert settings.coordinator_url == f"https://coordinator:{coord.port}"
        assert settings.endpoint() == f"https://{service}:{settings.port}"


def test_configs_are_strict_about_unknown_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo in a config must stop the service, not be ignored; the shipped files have none.
    clean_env(monkeypatch)
    bad = tmp_path / "bad.yaml"
    bad.write_text((DOCKER / "config" / "brand-node.yaml").read_text() + "\nprot: 9999\n")
    from confide.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="prot"):
        load_settings(NodeSettings, bad)


def test_every_compose_variable_has_a_default() -> None:
    text = COMPOSE.read_text()
    for m in re.finditer(r"\$\{([^}]*)\}", text):
        assert ":-" in m.group(1), f"${{{m.group(1)}}} has no default: compose would use ''"


# --- the PKI the compose file mounts ---------------------------------------------------------------


def test_documented_pki_command_generates_what_compose_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme_cmd = documented_pki_command((DOCKER / "README.md").read_text())
    compose_cmd = documented_pki_command(COMPOSE.read_text())
    assert readme_cmd == compose_cmd, "README and compose.yaml document different PKI commands"
    assert readme_cmd[:3] == ["confide", "pki", "init"]
    i = readme_cmd.index("--dir")
    assert (ROOT / readme_cmd[i + 1]).resolve() == (DOCKER / "pki").resolve(), "PKI lands elsewhere"

    out = tmp_path / "pki"
    args = readme_cmd[3:]
    args[args.index("--dir") + 1] = str(out)
    clean_env(monkeypatch)
    run = subprocess.run([sys.executable, "-m", "confide", "pki", "init", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    services = compose()["services"]
    hostnames = set()
    for name in CONFIDE:
        settings = settings_for(name, monkeypatch)
        for u in filter(None, [getattr(settings, "coordinator_url", None),
                               settings.endpoint() if isinstance(settings, NodeSettings) else None]):
            hostnames.add(make_url(u.replace("https://", "postgresql://", 1)).host)
    assert hostnames == {"coordinator", "brand-node", "partner-node"}

    for name, (_, party, _) in CONFIDE.items():
        settings = settings_for(name, monkeypatch)
        src = pki_source(services[name], Path(settings.pki_dir))
        d = out / Path(src).relative_to("pki")
        for f in PKI_FILES:
            assert (d / f).is_file(), f"{name}: {src}/{f} not generated"
        ident = pki.load_identity(d)
        assert ident.name == settings.name
        assert ident.role == ("coordinator" if name == "coordinator" else party)
        cert = x509.load_pem_x509_certificate(ident.cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(sans.get_values_for_type(x509.DNSName))
        names |= {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
        # Peers dial the compose names; the operator CLI in the container dials 127.0.0.1.
        missing = (hostnames | {"127.0.0.1"}) - names
        assert not missing, f"{name}: certificate lacks SANs {sorted(missing)}"
    assert (out / "ca" / "ca.key").is_file()


# --- the image ------------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_exactly_as_make_demo() -> None:
    instrs = dockerfile()
    assert instrs[0] == ("FROM", "python:3.11-slim")
    runs = [a for w, a in instrs if w == "RUN"]
    # The one install step is the Makefile target itself, with no variable overrides.
    assert runs.count("make install") == 1, f"the image must RUN `make install`, got {runs}"
    install_at = instrs.index(("RUN", "make install"))
    copy_at = instrs.index(("COPY", ". ."))
    assert copy_at < install_at
    others = [a for a in runs if a != "make install"]
    assert not pip_installs(others), "the image installs packages beside the Makefile"
    assert not any("venv" in a for a in runs), "the venv is the Makefile's business"

    # make demo / make test install through the same target the image runs.
    variables, rules = makefile()
    stamp = variables["STAMP"]
    for target in ("demo", "test", "install"):
        assert stamp in rules[target][0], f"`make {target}` skips the install"
    demo_installs = pip_installs(make_commands("demo"))
    image_installs = pip_installs(make_commands("install"))
    assert image_installs == demo_installs
    # pip itself, then torch at the project's pin (before anything could pull it unpinned),
    # then the project with its dev extra, editable.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    assert re.fullmatch(r"torch==[\d.]+", torch_pin), f"torch is not pinned exactly: {torch_pin}"
    assert [a[-1] for a in image_installs] == ["pip", torch_pin, ".[dev]"]
    assert image_installs[2][-2] == "-e", "the Makefile installs the project editable"


def test_image_runs_confide_as_a_non_root_user_with_a_healthcheck() -> None:
    instrs = dockerfile()
    words = [w for w, _ in instrs]
    users = [a for w, a in instrs if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the services must not run as root"
    assert words.index("USER") > [i for i, (w, a) in enumerate(instrs) if a == "make install"][0]
    entry = json.loads(next(a for w, a in instrs if w == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["confide"] and "confide" in scripts
    env = " ".join(a for w, a in instrs if w == "ENV")
    venv = makefile()[0]["VENV"]
    workdir = next(a for w, a in instrs if w == "WORKDIR")
    assert f"{workdir}/{venv}/bin" in env, "the Makefile's venv must be on PATH for the entry point"
    health = next(a for w, a in instrs if w == "HEALTHCHECK")
    cmd = json.loads(health.split("CMD", 1)[1])
    assert Path(cmd[1]) == Path(workdir) / HEALTHCHECK.relative_to(ROOT)
    compose_test = compose()["services"]["coordinator"]["healthcheck"]["test"]
    assert compose_test[1:] == cmd, "image and compose run different health checks"


def test_dockerignore_keeps_install_inputs_and_drops_venv_and_secrets() -> None:
    patterns = dockerignore()
    # The install target needs these; the health check is run from the copied repository.
    needed = ["Makefile", "pyproject.toml", "README.md", "docker/healthcheck.py", "confide/cli.py",
              "coordinator/storage/migrations/env.py", "party_node/storage/migrations/env.py"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed += pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for path in needed:
        path = path.rstrip("*")
        assert (ROOT / path).exists(), f"{path} missing from the repository"
        assert not ignored(path, patterns), f".dockerignore drops {path}, which the image needs"
    # A copied .venv (with its stamp) would make `make install` a no-op with host binaries.
    for path in (".venv", ".venv/.installed", "docker/pki", "docker/pki/brand/identity.key", ".git",
                 "docker/.env", "confide.egg-info", "demo-out"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the image"
    assert ignored("x/y/__pycache__/z.pyc", patterns)


def test_generated_secrets_are_kept_out_of_git() -> None:
    if not (ROOT / ".git").exists():
        pytest.fail("run the tests from a git checkout: this test checks what git would commit")
    for path in ("docker/pki/ca/ca.key", "docker/pki/brand/identity.key", "docker/.env"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert res.returncode == 0, f"git would let {path} be committed"
    for path in ("docker/compose.yaml", "docker/config/brand-node.yaml"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert res.returncode == 1, f"git ignores {path}, which the deployment needs"


# --- the PostgreSQL init script, against a throwaway server -----------------------------------------


def _pg_bindir() -> Path | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


@pytest.mark.slow
def test_postgres_init_script_gives_each_service_its_own_database_and_role() -> None:
    import shutil
    import tempfile

    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries (initdb) are not installed; the platform needs them")
    as_root = os.geteuid() == 0
    # initdb refuses to run as root; the server then runs as the `postgres` system user.
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    work = Path(tempfile.mkdtemp(prefix="confide-pg-"))
    if as_root:
        shutil.chown(work, "postgres")
    data, port = work / "data", _free_ports(1)[0]
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "PGHOST": str(work),
           "PGPORT": str(port)}
    pg_env = service_env(compose()["services"]["postgres"])

    def run(*cmd: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, "env", *(f"{k}={v}" for k, v in extra.items()), *cmd],
                              capture_output=True, text=True, env=env, cwd=work, timeout=120)

    def psql(user: str, db: str, sql: str) -> subprocess.CompletedProcess[str]:
        return run("psql", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", db, "-Atc", sql)

    try:
        res = run("initdb", "-D", str(data), "-U", pg_env["POSTGRES_USER"], "--auth=trust")
        assert res.returncode == 0, res.stderr
        # Unix socket only (no TCP listener): nothing on this machine's network changes.
        res = run("pg_ctl", "-D", str(data), "-w", "-l", str(work / "log"), "-o",
                  f"-p {port} -k {work} -c listen_addresses=", "start")
        assert res.returncode == 0, res.stderr + res.stdout
        # The script as the postgres image runs it: with the container's environment.
        res = run("sh", str(PG_INIT), **pg_env)
        assert res.returncode == 0, res.stderr

        owners = psql(pg_env["POSTGRES_USER"], "postgres",
                      "select datname || '=' || pg_get_userbyid(datdba) from pg_database order by 1")
        assert {f"{db}={db}" for db in created_databases()} <= set(owners.stdout.split())
        # Every service URL in the compose file names a database the script made, owned by its user.
        for name in CONFIDE:
            url = make_url(next(v for k, v in service_env(compose()["services"][name]).items()
                                if k.endswith("DATABASE_URL")))
            res = psql(str(url.username), str(url.database), "create table probe(x int); select 1")
            assert res.returncode == 0 and res.stdout.split()[-1] == "1", res.stderr
        # One service's role cannot open another's database.
        res = psql("brand", "partner", "select 1")
        assert res.returncode != 0 and "CONNECT" in res.stderr, res.stderr
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(work, ignore_errors=True)


# --- the health check, against real services -------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all sockets held open together, so none is handed out twice)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIDE_NODE_", "CONFIDE_COORDINATOR_"))}
    return subprocess.run([sys.executable, str(HEALTHCHECK), str(config)], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)


@pytest.mark.slow
def test_healthcheck_passes_against_running_services_and_fails_otherwise(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init(pki_dir, [("brand", "brand"), ("partner", "partner")])
    configs: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIDE_NODE_", "CONFIDE_COORDINATOR_"))}
    ports = dict(zip(("coordinator", "brand-node"), _free_ports(2)))
    try:
        for service in ("coordinator", "brand-node"):
            _, party, group = CONFIDE[service]
            values = yaml.safe_load((DOCKER / "config" / f"{service}.yaml").read_text())
            # The shipped config, moved to this machine: local paths, loopback, a free port.
            values |= {"pki_dir": str(pki_dir / party), "data_dir": str(tmp_path / party),
                       "host": "127.0.0.1", "port": ports[service]}
            configs[service] = tmp_path / f"{service}.yaml"
            configs[service].write_text(yaml.safe_dump(values))
            log = open(tmp_path / f"{service}.log", "wb")
            procs[service] = subprocess.Popen(
                [sys.executable, "-m", "confide", group, "serve", "--config", str(configs[service])],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
            log.close()
        for service, cfg in configs.items():
            deadline = time.monotonic() + 90
            while True:
                res = _healthcheck(cfg)
                if res.returncode == 0:
                    break
                assert procs[service].poll() is None, (tmp_path / f"{service}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, f"{service} never healthy: {res.stderr}"
                time.sleep(0.5)
            kind = "coordinator" if service == "coordinator" else "node"
            assert res.stdout.startswith(f"{kind} "), res.stdout

        # /health refuses a client without a deployment certificate: a plain check cannot pass.
        port = yaml.safe_load(configs["brand-node"].read_text())["port"]
        bare = ssl.create_default_context(cafile=str(pki_dir / "brand" / "ca.pem"))
        bare.check_hostname = False
        with pytest.raises(Exception):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=bare, timeout=5).read()

        # The partner's config pointed at the brand's listener: the right CA, the wrong node.
        wrong = yaml.safe_load(configs["brand-node"].read_text()) | {
            "name": "partner", "pki_dir": str(pki_dir / "partner")}
        (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
        res = _healthcheck(tmp_path / "wrong.yaml")
        assert res.returncode == 1 and "expected 'partner'" in res.stderr, res.stderr
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=20)
    # Stopped services are unhealthy.
    for cfg in configs.values():
        res = _healthcheck(cfg)
        assert res.returncode == 1 and res.stderr.startswith("unhealthy:"), res.stderr
