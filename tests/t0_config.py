"""serve's configuration: a TOML file supplies what flags do not; flags win; bad input is one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from marsfs.errors import InvalidRequest, UsageError
from marsfs.faces.config import load_config
from marsfs.units import parse_size

NO_FLAGS: dict[str, Any] = {"node": None, "state": None, "mount": None, "listen": None, "peer": [], "history": None, "cluster": None}


def test_config_file_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "marsfs.toml"
    conf.write_text('node = "n1"\nstate = "/s"\nmount = "/m"\nlisten = "127.0.0.1:7600"\n'
                    'history = "64M"\ncluster = "prod"\n[peers]\nn2 = "127.0.0.1:7601"\n')
    cfg = load_config(conf, NO_FLAGS)
    assert (cfg.node, str(cfg.state), str(cfg.mount), cfg.listen) == ("n1", "/s", "/m", "127.0.0.1:7600")
    assert cfg.peers == {"n2": "127.0.0.1:7601"} and cfg.history_bytes == 64 << 20 and cfg.cluster == "prod"
    cfg = load_config(conf, {**NO_FLAGS, "node": "n9", "peer": ["n3=127.0.0.1:7603"]})
    assert cfg.node == "n9" and cfg.peers == {"n2": "127.0.0.1:7601", "n3": "127.0.0.1:7603"}


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--node"):
        load_config(None, {**NO_FLAGS, "state": "/s", "mount": "/m"})
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.toml", NO_FLAGS)
    bad = tmp_path / "bad.toml"
    bad.write_text("node = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(bad, NO_FLAGS)
    with pytest.raises(UsageError, match="NAME=HOST:PORT"):
        load_config(None, {**NO_FLAGS, "node": "n", "state": "/s", "mount": "/m", "peer": ["n2"]})


@pytest.mark.parametrize("text,want", [("512", 512), ("512M", 512 << 20), ("10G", 10 << 30), ("1.5K", 1536),
                                       ("2GiB", 2 << 30), ("1t", 1 << 40)])
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "12Q", "-1M", "1.3"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)


SERVE = {**NO_FLAGS, "node": "n1", "mount": "/m"}


def test_serve_refuses_a_cluster_id_that_is_empty(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--cluster '': give a non-empty cluster id"):
        load_config(None, {**SERVE, "state": "/s", "cluster": ""})
    conf = tmp_path / "c.toml"
    conf.write_text('cluster = " "\n')
    with pytest.raises(UsageError, match="--cluster ' ': give a non-empty cluster id"):
        load_config(conf, {**SERVE, "state": "/s"})


def test_serve_refuses_itself_as_a_peer() -> None:
    """A peer is another node: this node's own name, or its own --listen address (the same
    host and port), is refused."""
    ok = {**SERVE, "state": "/s", "listen": "127.0.0.1:7600"}
    with pytest.raises(UsageError, match=r"--peer n1=127.0.0.1:7601: n1 is this node's own name"):
        load_config(None, {**ok, "peer": ["n1=127.0.0.1:7601"]})
    with pytest.raises(UsageError, match=r"--peer n2=127.0.0.1:7600: that is this node's own --listen address"):
        load_config(None, {**ok, "peer": ["n2=127.0.0.1:7600"]})
    assert load_config(None, {**ok, "peer": ["n2=127.0.0.1:7601"]}).peers == {"n2": "127.0.0.1:7601"}


def test_serve_refuses_a_log_space_its_filesystem_cannot_hold(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    total = st.f_blocks * st.f_frsize
    state = tmp_path / "state-not-made-yet"
    with pytest.raises(UsageError, match=rf"--log-space .* \({2 * total} bytes\) is more than the filesystem of "
                                         rf"{state} holds \(.* in all\)"):
        load_config(None, {**SERVE, "state": str(state), "log_space": str(2 * total)})
    with pytest.raises(UsageError, match="is more than the filesystem"):
        load_config(None, {**SERVE, "state": str(state), "log_space": "100000T"})
    cfg = load_config(None, {**SERVE, "state": str(state), "log_space": "64M"})
    assert cfg.log_space.size == 64 << 20


def test_metrics_address_from_the_file_or_the_flag(tmp_path: Path) -> None:
    """``metrics`` in the file, ``--metrics`` wins; a bad address or the peers' own port is one
    usage line naming the flag."""
    conf = tmp_path / "marsfs.toml"
    conf.write_text('node = "n1"\nstate = "/s"\nmount = "/m"\nlisten = "127.0.0.1:7600"\nmetrics = "127.0.0.1:9590"\n')
    assert load_config(conf, NO_FLAGS).metrics == "127.0.0.1:9590"
    assert load_config(conf, {**NO_FLAGS, "metrics": "[::1]:9591"}).metrics == "[::1]:9591"
    assert load_config(None, {**NO_FLAGS, "node": "n1", "state": "/s", "mount": "/m"}).metrics is None
    for bad in ("nonsense", "127.0.0.1:0", "127.0.0.1:99999", ":9590"):
        with pytest.raises(UsageError, match=r"^--metrics: address .*give HOST:PORT"):
            load_config(conf, {**NO_FLAGS, "metrics": bad})
    with pytest.raises(UsageError, match="--metrics 127.0.0.1:7600: that is the --listen address"):
        load_config(conf, {**NO_FLAGS, "metrics": "127.0.0.1:7600"})
    conf.write_text('node = "n1"\nstate = "/s"\nmount = "/m"\nmetrics = 9590\n')
    with pytest.raises(UsageError, match="--metrics 9590: give HOST:PORT"):
        load_config(conf, NO_FLAGS)
