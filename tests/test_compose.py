"""docker-compose.yml: no Docker engine runs in CI, so check what can be checked without one.

The file parses as YAML, has PostgreSQL and two MassTasker servers built from this repository's
Dockerfile, every MASSTASKER_* variable it sets is a real server flag, the servers wait for a healthy
database, and everything is published on the host's loopback only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from masstasker.server.config import ENV_PREFIX, parse_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def masstasker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name.startswith("masstasker")}


def test_postgres_and_two_servers(compose: dict[str, Any]) -> None:
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    servers = masstasker_services(compose)
    assert len(servers) == 2
    for service in servers.values():
        assert service["build"] == "."
        assert (ROOT / service["build"] / "Dockerfile").is_file()
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_server_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    """The server's own parser accepts every MASSTASKER_* value and each lands in its setting."""
    for service in masstasker_services(compose).values():
        env = {name: str(value) for name, value in service["environment"].items()}
        assert env["MASSTASKER_STORE"].startswith("postgresql://")
        settings = dataclasses.asdict(parse_args([], env, "test"))
        for name, value in env.items():
            if name.startswith(ENV_PREFIX):
                key = name.removeprefix(ENV_PREFIX).lower()
                assert key in settings, f"{name} is not a server setting"
                assert str(settings[key]) == value, name
        # The password reaches libpq through the environment, never through the logged DSN.
        assert ":" not in env["MASSTASKER_STORE"].split("@")[0].removeprefix("postgresql://")


def test_every_port_is_published_on_loopback_only(compose: dict[str, Any]) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published
    assert all(p.startswith("127.0.0.1:") for p in published), published
    hosts = [p.split(":")[1] for p in published]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"
