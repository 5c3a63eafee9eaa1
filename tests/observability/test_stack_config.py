"""The docker-compose stack, checked without a Docker engine by the real tools that read its files.

`promtool check config` validates the Prometheus config; Debian's `docker-compose config` parses and
normalises docker-compose.yml (it needs no engine). Then the pieces are checked against each
other: every file the stack mounts or builds from exists in the repo, Prometheus scrapes the
service and port the broker image listens on, Grafana's datasource points at the Prometheus
service, and the dashboard provider reads the directory the dashboard is mounted in.
Both tools come from Debian packages that scripts/test.sh installs; a missing tool fails the test.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from .dashboard import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    GRAFANA,
    PROMETHEUS_CONFIG,
    REPO,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BROKER_PORT = 8765


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/test.sh installs it (Debian package)")
    return path


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as docker-compose itself resolves it (paths made absolute)."""
    result = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume of a service, in either compose syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume["source"]), str(volume["target"])))
        else:
            source, target, *_ = str(volume).split(":")
            found.append((source, target))
    return found


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the bind mounts (sources that are paths, not volumes)."""
    return {t: Path(s) for s, t in mounts(service) if s.startswith("/")}


def resolve_in_container(service: dict[str, Any], container_path: str) -> Path:
    """The repo file a container path of a service comes from, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted from the repo")


def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_compose_services_and_pinned_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"broker", "prometheus", "grafana"}, sorted(services)
    for name, service in services.items():
        image = service.get("image", "")
        if "build" in service:
            continue  # built from the Dockerfile (broker, cluster nodes); base image checked below
        repo_part, _, tag = image.rpartition(":")
        assert repo_part and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: pin a full version, not {tag!r}"


def test_compose_builds_and_mounts_only_files_in_the_repo(compose: dict[str, Any]) -> None:
    services = compose["services"]
    build = services["broker"]["build"]
    context = Path(build["context"])
    assert context.resolve() == REPO.resolve()
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, target in mounts(service):
            if source.startswith("/"):
                path = Path(source)
                assert path.exists(), f"{name}: mounts missing {path} at {target}"
                assert REPO.resolve() in path.resolve().parents, f"{name}: {path} outside repo"
            else:
                assert source in declared_volumes, f"{name}: volume {source!r} not declared"
    # Prometheus and Grafana keep their data in named volumes.
    for name, data_dir in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        named = {t: s for s, t in mounts(services[name]) if not s.startswith("/")}
        assert data_dir in named, f"{name}: {data_dir} is not a named volume"


def test_prometheus_scrapes_the_broker_service(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_flag = next(
        a for a in prometheus["command"] if str(a).startswith("--config.file=")
    ).split("=", 1)[1]
    assert resolve_in_container(prometheus, config_flag).resolve() == PROMETHEUS_CONFIG.resolve()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "broker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"broker:{BROKER_PORT}"]
    assert "broker" in compose["services"]


CLUSTER_NODES = ("node1", "node2", "node3")


def test_cluster_profile(compose: dict[str, Any]) -> None:
    """`docker compose --profile cluster up`: Redis and three nodes on it, scraped by the same
    Prometheus (DNS service discovery of their shared alias), shown by the same Grafana."""
    services = compose["services"]
    cluster = {n for n, s in services.items() if "cluster" in (s.get("profiles") or [])}
    assert cluster == {"redis", *CLUSTER_NODES}, sorted(cluster)
    for name in ("broker", "prometheus", "grafana"):
        assert not services[name].get("profiles"), f"{name} must run with or without the profile"
    redis = services["redis"]
    assert redis["image"].startswith("redis:7."), "sharded pub/sub and RESP3 need Redis 7"
    host_ports = set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["image"] == services["broker"]["image"]
        assert Path(node["build"]["context"]).resolve() == REPO.resolve()
        url = node["environment"]["BROKER_REDIS"]
        assert re.fullmatch(r"redis://redis:6379/\d+", url), url
        assert "redis" in node["depends_on"]
        assert "broker-cluster" in node["networks"]["default"]["aliases"]
        (port,) = node["ports"]
        target = port["target"] if isinstance(port, dict) else int(str(port).split(":")[-1])
        published = port["published"] if isinstance(port, dict) else str(port).split(":")[0]
        assert int(target) == BROKER_PORT
        host_ports.add(int(published))
        # Same metrics token as the single broker, which Prometheus sends.
        token = resolve_in_container(node, node["environment"]["BROKER_METRICS_TOKEN_FILE"])
        broker = services["broker"]
        broker_token = broker["environment"]["BROKER_METRICS_TOKEN_FILE"]
        assert token.resolve() == resolve_in_container(broker, broker_token).resolve()
    assert len(host_ports) == len(CLUSTER_NODES) and BROKER_PORT not in host_ports
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "broker-cluster"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["broker-cluster"] and sd["port"] == BROKER_PORT
    assert job["authorization"]["credentials_file"] == "metrics-token"


def test_prometheus_sends_the_brokers_metrics_token(compose: dict[str, Any]) -> None:
    """The broker's --metrics-token-file and Prometheus' credentials_file are one repo file."""
    services = compose["services"]
    broker_path = services["broker"]["environment"]["BROKER_METRICS_TOKEN_FILE"]
    broker_file = resolve_in_container(services["broker"], broker_path)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "broker"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    config_flag = next(
        a for a in services["prometheus"]["command"] if str(a).startswith("--config.file=")
    ).split("=", 1)[1]
    config_dir = PurePosixPath(config_flag).parent  # Prometheus resolves relative paths here
    scraped = resolve_in_container(
        services["prometheus"], str(config_dir / auth["credentials_file"])
    )
    assert scraped.resolve() == broker_file.resolve()
    assert broker_file.read_text().strip(), "the token file is empty"


def test_grafana_provisioning_is_wired_to_the_mounts(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = resolve_in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning.resolve() == (GRAFANA / "provisioning").resolve()

    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [s["url"] for s in sources] == ["http://prometheus:9090"]
    assert "prometheus" in compose["services"]

    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_dir = resolve_in_container(grafana, provider["options"]["path"])
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    json.loads(DASHBOARD.read_text())

    # The dashboard is the home page: `docker compose up`, open Grafana, no clicks.
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert resolve_in_container(grafana, home).resolve() == DASHBOARD.resolve()
    # The dashboard names the provisioned datasource by uid.
    assert json.loads(DASHBOARD.read_text())["panels"][0]["datasource"]["uid"] == sources[0]["uid"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", "")):
            ignored = not negate
    return ignored


def test_dockerfile_builds_from_files_in_the_context() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), f"unpinned base {base}"
    for op, args in instructions:
        if op != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    # The context leaves out what the image must not depend on.
    for local in (".venv", ".git", "tests", "tests/artifacts"):
        assert dockerignored(local), f"{local} would be sent as build context"


def test_dockerfile_runs_the_broker_on_all_interfaces() -> None:
    instructions = dockerfile_instructions()
    last = dict(instructions)  # the last of each instruction is the one in force
    command = json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"])
    assert command == ["broker", "--host", "0.0.0.0", "--port", str(BROKER_PORT)]
    assert last["EXPOSE"].split() == [str(BROKER_PORT)]
    assert "/healthz" in last["HEALTHCHECK"]
    assert any(op == "RUN" and "pip install" in args for op, args in instructions)
    assert last.get("USER") not in (None, "root", "0"), "run the broker unprivileged"
