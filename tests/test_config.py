"""Configuration parsing: every variable, every malformed value named in the error."""

import pytest

from agenshield_shim import _config
from agenshield_shim._config import ShimConfigError, load, parse_allow


def test_defaults() -> None:
    config = load({})
    assert config.enabled is True
    assert (config.broker_host, config.broker_port) == ("localhost", 6969)
    assert config.log_level == "warn" and config.transport == "auto"
    assert config.allow == () and config.audit_log is None and config.broker_socket is None
    assert config.broker == "localhost:6969"


def test_every_variable() -> None:
    config = load(
        {
            "AGENSHIELD_ENABLED": "Yes",
            "AGENSHIELD_BROKER_HOST": " Broker.Internal. ",
            "AGENSHIELD_BROKER_PORT": "8443",
            "AGENSHIELD_LOG_LEVEL": "DEBUG",
            "AGENSHIELD_ALLOW": "127.0.0.1:5432, [::1]:6379; db.local:3306",
            "AGENSHIELD_AUDIT_LOG": "/var/log/agenshield.jsonl",
            "AGENSHIELD_TRANSPORT": "rpc",
            "AGENSHIELD_BROKER_SOCKET": "/run/agenshield.sock",
        }
    )
    assert config.broker == "broker.internal:8443"
    assert config.log_level == "debug" and config.transport == "rpc"
    assert config.allow == (("127.0.0.1", 5432), ("::1", 6379), ("db.local", 3306))
    assert config.audit_log == "/var/log/agenshield.jsonl"
    assert config.broker_socket == "/run/agenshield.sock"


def test_ipv6_broker_is_shown_with_brackets() -> None:
    assert load({"AGENSHIELD_BROKER_HOST": "[::1]"}).broker == "[::1]:6969"


@pytest.mark.parametrize("word", ["false", "0", "no", "off", " OFF "])
def test_disabled_words(word: str) -> None:
    assert _config.is_disabled({"AGENSHIELD_ENABLED": word})
    assert load({"AGENSHIELD_ENABLED": word}).enabled is False


@pytest.mark.parametrize("word", ["true", "", "maybe", "2"])
def test_not_disabled_unless_explicit(word: str) -> None:
    assert not _config.is_disabled({"AGENSHIELD_ENABLED": word})


@pytest.mark.parametrize(
    "variable, value",
    [
        ("AGENSHIELD_ENABLED", "maybe"),
        ("AGENSHIELD_ENABLED", ""),
        ("AGENSHIELD_BROKER_PORT", "abc"),
        ("AGENSHIELD_BROKER_PORT", "0"),
        ("AGENSHIELD_BROKER_PORT", "65536"),
        ("AGENSHIELD_BROKER_PORT", "٣"),  # a digit, but not an ASCII one
        ("AGENSHIELD_BROKER_HOST", ""),
        ("AGENSHIELD_BROKER_HOST", "exa mple.com"),
        ("AGENSHIELD_BROKER_HOST", "évil.com"),
        ("AGENSHIELD_LOG_LEVEL", "loud"),
        ("AGENSHIELD_TRANSPORT", "udp"),
        ("AGENSHIELD_ALLOW", "127.0.0.1"),
        ("AGENSHIELD_ALLOW", "::1:80"),
        ("AGENSHIELD_ALLOW", ":80"),
        ("AGENSHIELD_ALLOW", "127.0.0.1:http"),
        ("AGENSHIELD_AUDIT_LOG", "relative/path"),
        ("AGENSHIELD_BROKER_SOCKET", "broker.sock"),
    ],
)
def test_malformed_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ShimConfigError) as info:
        load({variable: value})
    assert variable in str(info.value)
    assert isinstance(info.value, ValueError)


def test_allow_list_edge_cases() -> None:
    assert parse_allow("") == ()
    assert parse_allow(" , ") == ()
    assert parse_allow("LOCALHOST:1") == (("localhost", 1),)


def test_boot_knows_every_variable() -> None:
    from agenshield_shim import _boot

    assert set(_boot.VARIABLES) == set(_config.VARIABLES)
    assert load({}).broker == "localhost:6969"  # the defaults the boot uses when nothing is set
    assert _boot.DEFAULT_POLICY == _boot.policy_for("localhost", 6969) == _boot.policy_from_config(load({}))


@pytest.mark.parametrize("name", _config.VARIABLES)
def test_boot_sees_any_variable_set(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The boot's quick look (os.environ's own store) and the plain mapping one agree."""
    import os

    from agenshield_shim import _boot

    for other in _config.VARIABLES:
        monkeypatch.delenv(other, raising=False)
    assert not _boot.any_variable_set(os.environ)
    assert not _boot.any_variable_set(dict(os.environ))
    monkeypatch.setenv(name, "")  # set, even when empty: the parser then says what is wrong
    assert _boot.any_variable_set(os.environ)
    assert _boot.any_variable_set(dict(os.environ))
    monkeypatch.setenv("AGENSHIELD_OTHER", "1")
    monkeypatch.delenv(name)
    assert not _boot.any_variable_set(os.environ)  # only the shim's own names count


def test_lock_file_replaces_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "agenshield_shim.lock"
    lock.write_text("# written by agenshield-shim install --lock\nAGENSHIELD_BROKER_PORT=7000\n")
    config = load(
        {"AGENSHIELD_ENABLED": "false", "AGENSHIELD_ALLOW": "example.com:80", "AGENSHIELD_LOG_LEVEL": "debug"},
        str(lock),
    )
    assert config.enabled is True and config.broker_port == 7000
    assert config.allow == ()  # the environment cannot widen a locked configuration
    assert config.log_level == "debug"  # but may make it chattier


@pytest.mark.parametrize(
    "text", ["AGENSHIELD_ENABLED=false\n", "AGENSHIELD_NOPE=1\n", "just words\n", "AGENSHIELD_BROKER_PORT=abc\n"]
)
def test_bad_lock_files_are_errors(tmp_path, text: str) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "agenshield_shim.lock"
    lock.write_text(text)
    with pytest.raises(ShimConfigError):
        load({}, str(lock))
