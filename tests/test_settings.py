"""Core settings: defaults, every environment variable, Cornserve's names, and clear errors."""

from __future__ import annotations

import logging
import os

import pytest

from sidecar_core import (
    SettingsError,
    Sidecar,
    SidecarConfig,
    SidecarSettings,
    TransportNotFoundError,
    get_registry,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without sidecar settings."""
    for key in list(os.environ):
        if key.startswith(("SIDECAR_", "CORNSERVE_")):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    settings = load_settings(SidecarSettings)
    assert settings.transport == "localhost"
    assert settings.transport_name == "localhost"
    assert settings.rank is None
    assert settings.is_local is False
    assert settings.host_template == "127.0.0.1"
    assert settings.base_port == 19000
    assert settings.peers is None
    assert (settings.recv_timeout, settings.send_timeout, settings.connect_timeout) == (60.0, 60.0, 10.0)
    assert settings.max_buffered_bytes == 8 << 30
    assert settings.chunk_size is None
    assert settings.auth_token is None
    assert settings.recv_device == "cpu"
    assert settings.mock_sidecar is False


def test_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "SIDECAR_TRANSPORT": "ucx",
        "SIDECAR_RANK": "3",
        "SIDECAR_IS_LOCAL": "true",
        "SIDECAR_HOST_TEMPLATE": "sidecar-{rank}.sidecar.default.svc",
        "SIDECAR_BASE_PORT": "20000",
        "SIDECAR_PEERS": '{"0": "10.0.0.5:19000", "7": "[::1]:19007"}',
        "SIDECAR_RECV_TIMEOUT": "1.5",
        "SIDECAR_SEND_TIMEOUT": "2",
        "SIDECAR_CONNECT_TIMEOUT": "0.25",
        "SIDECAR_MAX_BUFFERED_BYTES": "1048576",
        "SIDECAR_CHUNK_SIZE": "65536",
        "SIDECAR_AUTH_TOKEN": "s3cret",
        "SIDECAR_RECV_DEVICE": "cuda:1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(SidecarSettings)
    assert settings.transport_name == "ucx"
    assert settings.rank == 3
    assert settings.is_local is True
    assert settings.host_template.format(rank=2) == "sidecar-2.sidecar.default.svc"
    assert settings.base_port == 20000
    assert settings.peers == {0: "10.0.0.5:19000", 7: "[::1]:19007"}
    assert (settings.recv_timeout, settings.send_timeout, settings.connect_timeout) == (1.5, 2.0, 0.25)
    assert settings.max_buffered_bytes == 1 << 20
    assert settings.chunk_size == 65536
    assert settings.auth_token is not None
    assert settings.auth_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.recv_device == "cuda:1"


def test_overrides_win_and_none_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_RANK", "3")
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    settings = load_settings(SidecarSettings, rank=5, transport=None, recv_timeout=0.5)
    assert (settings.rank, settings.transport, settings.recv_timeout) == (5, "ucx", 0.5)


@pytest.mark.parametrize("variable", ["CORNSERVE_MOCK_SIDECAR", "SIDECAR_MOCK_SIDECAR"])
@pytest.mark.parametrize(
    ("value", "mock"),
    [("1", True), ("true", True), ("True", True), ("0", False), ("false", False), ("", False), (" 1", False)],
)
def test_mock_switch(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, mock: bool) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    monkeypatch.setenv(variable, value)
    settings = load_settings(SidecarSettings)
    assert settings.mock_sidecar is mock
    assert settings.transport_name == ("mock-file" if mock else "ucx")


@pytest.mark.parametrize("value", ["perhaps", "yes", "on", "2", "off"])
def test_other_mock_switch_values_are_off_as_in_cornserve_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    # Cornserve switches mock mode on for 1 or true only: "yes" (true to pydantic) must not switch a
    # deployment to files, and "off" must not stop it starting.
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR", value)
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        assert not load_settings(SidecarSettings).mock_sidecar
    assert f"CORNSERVE_MOCK_SIDECAR={value!r} is not 1 or true: mock-file stays off" in caplog.text


def test_malformed_json_peers_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_PEERS", "{0: 127.0.0.1:19000")
    with pytest.raises(SettingsError) as info:
        load_settings(SidecarSettings)
    message = str(info.value)
    # pydantic-settings hands malformed JSON on as a string, which then fails as "not a dictionary".
    assert "SIDECAR_PEERS" in message, message
    assert "{0: 127.0.0.1:19000" in message, message
    assert "JSON" in message or "valid dictionary" in message, message
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SIDECAR_RANK", "abc", "valid integer"),
        ("SIDECAR_RANK", "-1", "greater than or equal to 0"),
        ("SIDECAR_RANK", "9" * 300, "less than or equal to 1000000"),
        ("SIDECAR_BASE_PORT", "70000", "less than or equal to 65535"),
        ("SIDECAR_RECV_TIMEOUT", "-1", "greater than 0"),
        ("SIDECAR_SEND_TIMEOUT", "soon", "valid number"),
        ("SIDECAR_CONNECT_TIMEOUT", "0", "greater than 0"),
        ("SIDECAR_MAX_BUFFERED_BYTES", "1.5GB", "valid integer"),
        ("SIDECAR_CHUNK_SIZE", "0", "greater than 0"),
        ("SIDECAR_IS_LOCAL", "maybe", "valid boolean"),
        ("SIDECAR_RECV_DEVICE", "gpu", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("SIDECAR_RECV_DEVICE", "cpu:0", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("SIDECAR_RECV_DEVICE", "cuda:", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("SIDECAR_RECV_DEVICE", "cpu:", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("SIDECAR_RECV_DEVICE", "cuda:\u00b2", "expected 'cpu', 'cuda' or 'cuda:N'"),  # a digit to isdigit()
        ("SIDECAR_RECV_DEVICE", "cuda:128", "with N from 0 to 127"),  # torch would read it as cuda:-128
        ("SIDECAR_RECV_DEVICE", "cuda:" + "9" * 20, "with N from 0 to 127"),
        ("SIDECAR_RECV_TIMEOUT", "inf", "finite number"),
        ("SIDECAR_SEND_TIMEOUT", "1e12", "less than or equal to"),
        ("SIDECAR_PEERS", '{"zero": "h:1"}', "valid integer"),
        ("SIDECAR_PEERS", '["h:1"]', "valid dictionary"),
    ],
)
def test_wrong_values_name_variable_value_and_expectation(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings(SidecarSettings)
    message = str(info.value)
    assert message.startswith("invalid sidecar setting: ")
    assert f"{variable}=" in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("token", "expected"),
    [("", "is empty; unset it"), ("weak\udcfftoken", "is not valid UTF-8 text")],
)
def test_an_unusable_auth_token_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, token: str, expected: str
) -> None:
    # An empty token is an HMAC key anyone has; one that is not text cannot key an HMAC at all (the
    # connection attempts then failed with an error quoting a character of the token).
    monkeypatch.setenv("SIDECAR_AUTH_TOKEN", token)
    with pytest.raises(SettingsError) as info:
        load_settings(SidecarSettings)
    assert f"SIDECAR_AUTH_TOKEN=(hidden): Value error, {expected}" in str(info.value)
    assert "weak" not in str(info.value), "the token itself is never shown"


def test_several_problems_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_RANK", "x")
    monkeypatch.setenv("SIDECAR_BASE_PORT", "0")
    with pytest.raises(SettingsError, match=r'SIDECAR_RANK="x".*; SIDECAR_BASE_PORT="0"'):
        load_settings(SidecarSettings)


def test_a_cuda_receive_device_this_process_lacks_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, only ucx checked: localhost and mock-file started, and every tensor sent to them failed.
    monkeypatch.setenv("SIDECAR_RECV_DEVICE", "cuda:127")  # no machine has 128 GPUs
    with pytest.raises(SettingsError, match=r"SIDECAR_RECV_DEVICE=cuda:127 but torch \S+ sees"):
        Sidecar(SidecarConfig(sidecar_rank=0, transport="mock-file"))


def test_sidecar_reports_bad_settings_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_SEND_TIMEOUT", "never")
    with pytest.raises(SettingsError, match="SIDECAR_SEND_TIMEOUT"):
        Sidecar(SidecarConfig(sidecar_rank=0))


def test_unknown_transport_lists_installed_and_suggests() -> None:
    with pytest.raises(TransportNotFoundError) as info:
        Sidecar(SidecarConfig(sidecar_rank=0, transport="localhots"))
    message = str(info.value)
    assert "unknown transport 'localhots'. Did you mean 'localhost'?" in message
    installed = message.split("Installed transports:")[1]
    for name in get_registry().transports:
        assert name in installed
    assert "SidecarConfig(transport=...)" in installed, "the message names every way a transport is chosen"
    assert isinstance(info.value, LookupError)


def test_unknown_transport_without_a_close_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "carrier-pigeon")
    with pytest.raises(TransportNotFoundError) as info:
        Sidecar(SidecarConfig(sidecar_rank=0))
    assert "Did you mean" not in str(info.value)
    assert "Installed transports: " in str(info.value)


def test_mock_switch_selects_mock_file_over_sidecar_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "no-such-transport")
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR", "1")
    assert load_settings(SidecarSettings).transport_name == "mock-file"
    assert get_registry().transport("mock-file").name == "mock-file"
    # A transport named in code wins over the switch (sidecar demo --transport does that).
    with Sidecar(SidecarConfig(sidecar_rank=0, transport="localhost")) as sidecar:
        assert sidecar.transport_name == "localhost"
