"""Target devices reached over SSH: the devices file and ``--remote`` specs.

A devices file is YAML, validated strictly like a recipe (unknown keys and wrong types are errors,
all listed at once)::

    devices:
      pi5:
        host: 192.168.1.42
        user: pi
        port: 22                       # default 22
        identity_file: ~/.ssh/id_ed25519
        python: /usr/bin/python3       # the device's Python, with numpy + onnxruntime installed
        work_dir: /tmp                 # a fresh edgec-<random> folder is made here and removed after
        providers: [CPUExecutionProvider]
        known_hosts: ~/.ssh/known_hosts  # default: OpenSSH's own (~/.ssh/known_hosts)
        connect_timeout_s: 10
        timeout_s: 900                 # the whole measurement
        emulated: false                # true: latencies are labelled emulated (never a device speed)

Its path comes from ``--devices FILE`` or the ``EDGEC_DEVICES`` environment variable. ``--remote``
takes a name from that file or an ``ssh://user@host[:port]`` URL (the other fields at defaults).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from edgec.errors import DeviceError, InputError
from edgec.stages.config import Strict

__all__ = ["DEVICES_ENV", "Device", "DevicesFile", "load_devices", "resolve_device"]

DEVICES_ENV = "EDGEC_DEVICES"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST = re.compile(r"^[A-Za-z0-9_.:%-]+$")  # a name, an IPv4 or a bare IPv6 address; never an option
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class Device(Strict):
    """One SSH device. ``host``/``user`` are checked so that they can never be read as an ssh option."""

    name: StrictStr = ""
    host: StrictStr
    port: StrictInt = Field(22, ge=1, le=65535)
    user: StrictStr | None = None
    identity_file: StrictStr | None = Field(None, description="private key; key authentication only")
    python: StrictStr = Field("python3", description="the device's Python (a path, or a name on its PATH)")
    work_dir: StrictStr | None = Field(None, description="parent of the per-bench folder (default: the "
                                                         "device's temp dir); the folder is removed after")
    providers: list[StrictStr] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    known_hosts: StrictStr | None = Field(None, description="known_hosts file (default: ~/.ssh/known_hosts)")
    connect_timeout_s: StrictInt = Field(10, ge=1, le=600)
    timeout_s: StrictInt = Field(900, ge=1, description="limit for the whole measurement on the device")
    emulated: StrictBool = Field(False, description="an emulator (e.g. qemu-user): latency is not a device speed")
    description: StrictStr = ""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not _HOST.match(v) or v.startswith("-"):
            raise ValueError(f"{v!r} is not a host name or address")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER.match(v):
            raise ValueError(f"{v!r} is not a user name")
        return v

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        if not v.strip() or v.startswith("-"):
            raise ValueError("python must be the path or name of the device's Python")
        return v

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}"

    @property
    def label(self) -> str:
        """How the device appears beside every number it measured."""
        return self.name or self.url


class DevicesFile(Strict):
    devices: dict[StrictStr, Device] = Field(..., min_length=1)

    @field_validator("devices")
    @classmethod
    def _names(cls, v: dict[str, Device]) -> dict[str, Device]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"device name {name!r}: use letters, digits, '.', '_' and '-'")
        return v


def _expand(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


def load_devices(path: str | os.PathLike) -> dict[str, Device]:
    """Read and validate a devices file; identity/known_hosts paths are resolved against its folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"devices file {str(path)!r} does not exist",
                         hint=f"pass --devices FILE or set {DEVICES_ENV}; see README 'Target devices' for the format")
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"devices file {str(path)!r} is not valid YAML: {e}") from e
    try:
        parsed = DevicesFile.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise InputError(f"devices file {str(path)!r} is invalid:\n" + "\n".join(f"  - {p}" for p in problems),
                         hint="top level `devices:`, one entry per device with host (required), port, user, "
                              "identity_file, python, work_dir, providers, known_hosts") from e
    base = path.resolve().parent
    return {name: dev.model_copy(update={"name": name, "identity_file": _expand(dev.identity_file, base),
                                         "known_hosts": _expand(dev.known_hosts, base)})
            for name, dev in parsed.devices.items()}


def _from_url(spec: str) -> Device:
    parts = urlsplit(spec)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password is not None:
        raise InputError(f"--remote {spec!r}: expected ssh://user@host[:port] (no path, no password)",
                         hint="key authentication only: put the key in ssh-agent or a devices file's identity_file")
    try:
        port = parts.port or 22
    except ValueError as e:
        raise InputError(f"--remote {spec!r}: bad port ({e})") from e
    try:
        return Device(host=parts.hostname or "", port=port, user=parts.username)
    except ValidationError as e:
        raise InputError(f"--remote {spec!r}: " + "; ".join(err["msg"] for err in e.errors())) from e


def resolve_device(spec: str, devices_file: str | os.PathLike | None = None) -> Device:
    """``ssh://user@host[:port]`` or a device name from ``devices_file`` (default: ``$EDGEC_DEVICES``)."""
    if not isinstance(spec, str) or not spec:
        raise InputError("--remote needs a device name or ssh://user@host[:port]")
    if spec.startswith("ssh://"):
        return _from_url(spec)
    file = devices_file or os.environ.get(DEVICES_ENV)
    if not file:
        raise DeviceError(f"--remote {spec!r} names a device, but no devices file is given",
                          hint=f"pass --devices FILE or set {DEVICES_ENV}=FILE, or use --remote ssh://user@host[:port]")
    devices = load_devices(file)
    if spec not in devices:
        from edgec.registry import did_you_mean

        raise DeviceError(f"no device {spec!r} in {file}: {did_you_mean(spec, list(devices))}",
                          hint="add it to the devices file, or use --remote ssh://user@host[:port]")
    return devices[spec]
