"""packaging/: the systemd unit passes ``systemd-analyze verify`` and has the keys the daemon's
stop and readiness need; the example config loads with the real loader, also with every
commented-out key switched on."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from marsfs.faces.config import CONFIG_KEYS, DEFAULT_STOP_TIMEOUT, load_config

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNIT = PACKAGING / "marsfs.service"
EXAMPLE = PACKAGING / "marsfs.toml"
FLAGS_UNSET: dict[str, object] = {"node": None, "state": None, "mount": None, "listen": None, "peer": [],
                                  "history": None, "cluster": None, "stop_timeout": None, "log_space": None,
                                  "sync_rate": None}
#: Options that give the service its own mount namespace (a FUSE mount made there would not
#: reach the host) or a device policy that shuts /dev/fuse out.
NAMESPACING = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "ProtectClock", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
               "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
               "MountFlags", "DevicePolicy", "DeviceAllow", "DynamicUser", "User"}


def unit_keys(text: str) -> dict[str, dict[str, str]]:
    """``{section: {key: value}}`` of a unit file (a repeated key keeps its last value)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None and "=" in line, f"not a unit file line: {raw!r}"
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    return sections


def seconds(value: str) -> float:
    """A unit file time span (``90``, ``90s``, ``5min``, ``infinity``) in seconds."""
    if value == "infinity":
        return math.inf
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)\s*(\w*)", value)
    assert m and m.group(2) in units, f"unexpected time span {value!r}"
    return int(m.group(1)) * units[m.group(2)]


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        why = "systemd-analyze is missing: install the systemd package (scripts/test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return tool


def verify(unit_text: str, where: Path) -> list[str]:
    """Render the unit (its ExecStart program replaced by a stand-in that exists here, as the
    install puts marsfs there) and verify it; what systemd-analyze says about it, if anything."""
    program = unit_keys(unit_text)["Service"]["ExecStart"].split()[0]
    stand_in = where / "marsfs"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = where / "marsfs.service"
    unit.write_text(unit_text.replace(program, os.fspath(stand_in)))
    r = subprocess.run([systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", os.fspath(unit)],
                       capture_output=True, text=True, timeout=60, cwd=where)
    said = [line for line in (r.stdout + r.stderr).splitlines() if "marsfs" in line]
    if r.returncode != 0 and not said:
        said = [f"exit {r.returncode}: {r.stderr.strip()}"]
    return said


def test_unit_verifies(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == []


def test_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check can fail: a misspelt value and an unknown key are both reported."""
    bad = UNIT.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGTREM\nRestartt=always")
    said = verify(bad, tmp_path)
    assert any("SIGTREM" in line for line in said) and any("Restartt" in line for line in said), said


def test_unit_keys() -> None:
    keys = unit_keys(UNIT.read_text())
    service = keys["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/marsfs/marsfs.toml"]
    assert service["Restart"] == "on-failure"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"  # the daemon's clean stop
    assert "KillMode" not in service or service["KillMode"] in ("control-group", "mixed")
    # systemd must wait for the drain (stop-timeout) and the flush before it kills
    assert seconds(service["TimeoutStopSec"]) > DEFAULT_STOP_TIMEOUT + 30
    assert seconds(service.get("TimeoutStartSec", "90")) == math.inf  # recovery takes as long as the logs
    assert service.get("NotifyAccess", "main") == "main"
    assert not NAMESPACING & set(service), NAMESPACING & set(service)
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"].split()
    assert keys["Install"]["WantedBy"] == "multi-user.target"
    # the example config says the same stop timeout as the unit
    assert f"TimeoutStopSec ({seconds(service['TimeoutStopSec']):g})" in EXAMPLE.read_text()


def test_example_config_loads(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, FLAGS_UNSET)
    assert (cfg.node, cfg.state, cfg.mount) == ("node1", Path("/var/lib/marsfs"), Path("/mnt/marsfs"))
    assert cfg.listen is None and cfg.peers == {} and cfg.stop_timeout == DEFAULT_STOP_TIMEOUT


def test_example_config_documents_every_key(tmp_path: Path) -> None:
    """Every commented-out key, switched on, loads too, and together they are all the keys."""
    text = re.sub(r"(?m)^# ((?:[a-z][a-z0-9-]*) = .*|\[peers\])$", r"\1", EXAMPLE.read_text())
    switched = tmp_path / "marsfs.toml"
    switched.write_text(text)
    keys = set(re.findall(r"(?m)^([a-z][a-z-]*) = ", text.split("\n[peers]\n")[0])) | {"peers"}
    assert keys == CONFIG_KEYS
    cfg = load_config(switched, FLAGS_UNSET)
    assert cfg.listen == "10.0.0.1:7600" and cfg.peers == {"node2": "10.0.0.2:7600", "node3": "10.0.0.3:7600"}
    assert cfg.sync_rate == 50 << 20 and cfg.cluster == "marsfs" and cfg.log_space.size == 20 << 30
