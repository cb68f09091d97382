"""Settings read from the environment (prefix ``SIDECAR_``), with Cornserve's names kept working.

Every field maps to one environment variable, ``SIDECAR_<FIELD>``; the ``Field`` descriptions
below are the settings reference (``docs/settings.md`` is generated from them). A transport may
add its own settings class with the prefix ``SIDECAR_<TRANSPORT>__`` (see :func:`load_settings`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar, get_args

import pydantic
import pydantic_settings
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar_core._errors import SettingsError

_GiB = 1 << 30
#: Longest timeout a thread can wait for (``threading.TIMEOUT_MAX``, about 49 days on Linux).
_MAX_WAIT = threading.TIMEOUT_MAX
logger = logging.getLogger("sidecar")
#: Variables that runs in a private environment of their own (tests, ``sidecar demo``, ``sidecar bench``)
#: remove: they would switch the transport (Cornserve's mock switch) or send the run's ranks to
#: addresses other than the transport's test environment gives them.
UNSET_IN_PRIVATE_RUNS = ("CORNSERVE_MOCK_SIDECAR", "SIDECAR_MOCK_SIDECAR", "SIDECAR_PEERS")
#: The largest CUDA device index torch takes (it keeps one in 8 bits).
_MAX_CUDA_INDEX = 127

#: The largest rank (a rank names a port, a socket file, ... : it stays a short number).
MAX_RANK = 1_000_000
Rank = Annotated[int, Field(ge=0, le=MAX_RANK)]


class SidecarSettings(BaseSettings):
    """The core settings of one sidecar process."""

    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    transport: str = Field(
        "localhost", description="Transport plugin that moves frames (`sidecar plugins` lists them)."
    )
    rank: Rank | None = Field(None, description="This process's sidecar rank (`SidecarConfig` overrides).")
    is_local: bool = Field(False, description="Route every rank to loopback, whatever the host template says.")
    host_template: str = Field(
        "127.0.0.1",
        description="Host of rank N, `{rank}` replaced, e.g. `sidecar-{rank}.sidecar.default.svc`.",
    )
    base_port: int = Field(19000, ge=1, le=65535, description="Rank N listens on `base_port + N` (network transports).")
    peers: dict[Rank, str] | None = Field(
        None, description='Explicit JSON map of rank to `host:port`, e.g. `{"0": "10.0.0.5:19000"}`.'
    )
    recv_timeout: float = Field(
        60.0, gt=0, le=_MAX_WAIT, allow_inf_nan=False, description="Seconds `recv` waits for a chunk."
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        le=_MAX_WAIT,
        allow_inf_nan=False,
        description=(
            "Seconds `send` waits for every destination. A receiver short of room drops a message in parts "
            "that no part reached for twice as long: set the same value on every sidecar."
        ),
    )
    connect_timeout: float = Field(
        10.0, gt=0, le=_MAX_WAIT, allow_inf_nan=False, description="Seconds to wait when connecting to a peer."
    )
    max_buffered_bytes: int = Field(8 * _GiB, gt=0, description="Bound on received bytes held until `mark_done`.")
    chunk_size: int | None = Field(
        None, gt=0, description="Split messages above this many bytes into parts (unset: transport's choice)."
    )
    auth_token: SecretStr | None = Field(None, description="Shared secret; peers without it are refused.")
    recv_device: str = Field(
        "cpu", description="Where received tensors land: `cpu`, or `cuda`/`cuda:N` where the transport can."
    )
    mock_sidecar: bool = Field(
        False,
        validation_alias=AliasChoices("CORNSERVE_MOCK_SIDECAR", "SIDECAR_MOCK_SIDECAR"),
        description="Cornserve's switch: `1` or `true` (any case) selects the `mock-file` transport; anything else "
        "leaves it off, as in Cornserve.",
    )

    @field_validator("mock_sidecar", mode="before")
    @classmethod
    def _cornserve_switch(cls, value: object) -> object:
        # Read as Cornserve reads it: "1" or "true" (any case) is on, anything else off. "yes" or "on",
        # which pydantic would take as true, must not switch a deployment to files.
        if not isinstance(value, str):
            return value
        on = value == "1" or value.lower() == "true"
        if not on and value.lower() not in ("", "0", "false"):
            logger.warning("CORNSERVE_MOCK_SIDECAR=%r is not 1 or true: mock-file stays off, as in Cornserve", value)
        return on

    @field_validator("auth_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Neither message quotes the token. An empty one would be an HMAC key anyone has.
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret:
            raise ValueError("is empty; unset it, or set the same long random token on every sidecar")
        try:
            secret.encode()
        except UnicodeEncodeError:
            raise ValueError("is not valid UTF-8 text; use a random hex token such as secrets.token_hex(32)") from None
        return value

    @field_validator("recv_device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        match = re.fullmatch(r"cpu|cuda(?::([0-9]{1,4}))?", value)  # not isdigit(): it takes "²" and other digits
        if match is None or int(match.group(1) or 0) > _MAX_CUDA_INDEX:
            raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N' with N from 0 to {_MAX_CUDA_INDEX}")
        return value

    @property
    def transport_name(self) -> str:
        """The transport to use, with ``CORNSERVE_MOCK_SIDECAR`` taking precedence."""
        return "mock-file" if self.mock_sidecar else self.transport


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def enter_private_environment(env: Mapping[str, str]) -> None:
    """Set ``env`` in this process's environment for a run of its own, less :data:`UNSET_IN_PRIVATE_RUNS`.

    Those variables are unset first, so only values that ``env`` gives them stay.
    """
    for variable in UNSET_IN_PRIVATE_RUNS:
        os.environ.pop(variable, None)
    os.environ.update(env)


def check_recv_device(recv_device: str) -> None:
    """Check that ``SIDECAR_RECV_DEVICE`` names a device this process has (it imports torch for a CUDA one).

    Raises:
        SettingsError: It names CUDA, and torch sees no CUDA device or fewer than its index needs.
    """
    if not recv_device.startswith("cuda"):
        return
    import torch

    # Counted without initialising CUDA (through NVML where it can): is_available() would, and a
    # process forked after that could not use CUDA.
    count = torch.cuda.device_count()
    index = torch.device(recv_device).index
    if count == 0:
        raise SettingsError(
            f"invalid sidecar setting: SIDECAR_RECV_DEVICE={recv_device} but torch {torch.__version__} sees no CUDA "
            "device; set SIDECAR_RECV_DEVICE=cpu or run on a CUDA host"
        )
    if index is not None and index >= count:
        raise SettingsError(
            f"invalid sidecar setting: SIDECAR_RECV_DEVICE={recv_device} but torch {torch.__version__} sees {count} "
            f"CUDA device(s); pick one of cuda:0 to cuda:{count - 1}"
        )


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` (a field name or one of its aliases) of ``settings_cls``.

    For a field with several names, the one set in the environment is named (else the first).
    """
    for name, info in settings_cls.model_fields.items():
        alias = info.validation_alias
        choices = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if field == name or field in choices:
            if choices:
                present = {key.upper() for key in os.environ}
                return next((c for c in choices if c.upper() in present), choices[0])
            break
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def _is_secret(settings_cls: type[BaseSettings], field: str) -> bool:
    """Whether ``field`` holds a secret, whose value an error must not show."""
    info = settings_cls.model_fields.get(field)
    return info is not None and SecretStr in (info.annotation, *get_args(info.annotation))


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _warn_unknown(settings_cls: type[BaseSettings]) -> None:
    """Log environment variables with the class's prefix that name no field (usually typos)."""
    prefix = str(settings_cls.model_config.get("env_prefix", "")).upper()
    if not prefix:
        return
    known = {env_name(settings_cls, field) for field in settings_cls.model_fields}
    for key in os.environ:
        name = key.upper()
        rest = name[len(prefix) :]
        # Nested prefixes (SIDECAR_UCX__...) belong to transports; SIDECAR_TEST_* to the test suite.
        if not name.startswith(prefix) or "__" in rest or rest.startswith("TEST_") or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        guess = f"; did you mean {close[0]}?" if close else ""
        logger.warning("ignoring unknown sidecar setting %s%s", key, guess)


def load_settings(settings_cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build ``settings_cls`` from the environment plus explicit overrides.

    Args:
        settings_cls: A pydantic-settings class (the core's or a transport's).
        **overrides: Values that win over the environment (``None`` values are ignored).

    Returns:
        The validated settings.

    Raises:
        SettingsError: A value is malformed; the message names the environment variable, the value
            that was given and what is expected.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(settings_cls.model_fields))
    if unknown:
        known = list(settings_cls.model_fields)
        hints = [f"{key!r}{_did_you_mean(key, known)}" for key in unknown]
        raise SettingsError(f"unknown sidecar setting(s) {', '.join(hints)}; the settings are {', '.join(known)}")
    _warn_unknown(settings_cls)
    try:
        return settings_cls(**given)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            value = "(hidden)" if _is_secret(settings_cls, field) else json.dumps(err.get("input"), default=str)
            problems.append(f"{env_name(settings_cls, field)}={value}: {err['msg']}")
        raise SettingsError("invalid sidecar setting: " + "; ".join(problems)) from None
    except pydantic_settings.SettingsError as exc:
        # Raised for values that must be JSON (maps, lists) and are not.
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        info = settings_cls.model_fields.get(field)
        expected = f" ({info.description})" if info is not None and info.description else ""
        raise SettingsError(
            f"invalid sidecar setting: {env_name(settings_cls, field)} is not valid JSON "
            f"({exc.__cause__ or exc}); give valid JSON{expected}"
        ) from None
