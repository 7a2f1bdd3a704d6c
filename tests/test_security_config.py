"""Security settings from flags and MASSTASKER_* variables, and the warnings about exposure."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from masstasker.server import BackgroundServer, Settings
from masstasker.server.config import parse_args
from masstasker.server.tls import exposure_warnings, is_loopback

LIMIT_FLAGS = {
    "--max-update-tasks": "max_update_tasks",
    "--max-payload-bytes": "max_payload_bytes",
    "--max-group-bytes": "max_group_bytes",
    "--max-labels": "max_labels",
    "--max-label-key-bytes": "max_label_key_bytes",
    "--max-label-value-bytes": "max_label_value_bytes",
    "--max-waiting-queries": "max_waiting_queries",
    "--max-waiting-per-connection": "max_waiting_per_connection",
}


def parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return parse_args(argv, env or {}, "test")


def test_defaults_are_plaintext_without_auth_and_metrics_on_loopback() -> None:
    settings = parse([])
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.auth_token_file) == ("",) * 4
    assert not settings.metrics_auth
    assert is_loopback(settings.listen_http.rpartition(":")[0])
    for field in LIMIT_FLAGS.values():
        assert getattr(settings, field) > 0


def test_security_flags() -> None:
    tls = ["--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-client-ca", "ca.crt"]
    settings = parse([*tls, "--auth-token-file", "tokens", "--metrics-auth"])
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == ("s.crt", "s.key", "ca.crt")
    assert settings.auth_token_file == "tokens"
    assert settings.metrics_auth


def test_security_environment() -> None:
    env = {
        "MASSTASKER_TLS_CERT": "s.crt",
        "MASSTASKER_TLS_KEY": "s.key",
        "MASSTASKER_TLS_CLIENT_CA": "ca.crt",
        "MASSTASKER_AUTH_TOKEN_FILE": "tokens",
        "MASSTASKER_METRICS_AUTH": "true",
    }
    settings = parse([], env)
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == ("s.crt", "s.key", "ca.crt")
    assert settings.auth_token_file == "tokens"
    assert settings.metrics_auth
    assert not parse(["--metrics-auth=false"], env).metrics_auth  # the command line wins


@pytest.mark.parametrize(("flag", "field"), LIMIT_FLAGS.items())
def test_limit_flags_and_environment(flag: str, field: str) -> None:
    assert getattr(parse([flag, "7"]), field) == 7
    env = {"MASSTASKER_" + flag[2:].upper().replace("-", "_"): "9"}
    assert getattr(parse([], env), field) == 9
    assert getattr(parse([flag, "7"], env), field) == 7


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-labels", "0"],
        ["--max-payload-bytes", "-1"],
        ["--tls-cert", "s.crt"],
        ["--tls-key", "s.key"],
        ["--tls-client-ca", "ca.crt"],
        ["--metrics-auth"],
        ["--auth-token-file", "t", "--metrics-auth=maybe"],
    ],
)
def test_bad_security_settings_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("tasks.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_warnings() -> None:
    assert exposure_warnings(Settings(), "127.0.0.1") == []
    plain = exposure_warnings(Settings(), "0.0.0.0")
    assert len(plain) == 2 and "PLAINTEXT" in plain[0] and "--auth-token-file" in plain[1]
    tokens_in_clear = exposure_warnings(Settings(auth_token_file="t"), "0.0.0.0")
    assert len(tokens_in_clear) == 1 and "bearer tokens" in tokens_in_clear[0]
    assert exposure_warnings(Settings(tls_cert="c", tls_key="k", auth_token_file="t"), "0.0.0.0") == []
    assert exposure_warnings(Settings(tls_cert="c", tls_key="k", tls_client_ca="ca"), "0.0.0.0") == []


def test_plaintext_loopback_server_does_not_warn(
    make_server: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="masstasker.server")
    make_server()
    assert "listening on 127.0.0.1:" in caplog.text and "transport: plaintext; no token needed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
