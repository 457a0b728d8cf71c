"""``serve --metrics`` in-process: the collector against a real node, its HTTP responder on trio,
and the files built on the metrics (docs/metrics.md, packaging/alerts.yml, the Grafana dashboard).

What holds:

* every figure is the status row's (the same call ``status --json`` answers from), the state
  and role gauges have exactly one 1, the counters and the fsync histogram count what the
  core did;
* docs/metrics.md lists exactly the metrics exported, with their types and labels;
* the responder answers GET /metrics, 404 otherwise, refuses an oversized head, closes a
  client that sends nothing once its deadline passes while other scrapes are answered, and
  refuses more clients than it serves at once;
* the alert rules pass ``promtool check rules`` and fire on synthetic series (``promtool test
  rules``); the dashboard parses and names only exported metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from marsfs.errors import MarsError
from marsfs.faces import metrics
from marsfs.node import Node
from marsfs.node.state import PeerStatus, ReplicationMode, SyncModeStatus, SyncState, VolumeStatus
from marsfs.node.status import node_statuses
from marsfs.node.volstate import Role, VolumeState
from marsfs.testing.checks import make_mirror
from marsfs.testing.harness import free_port
from marsfs.testing.runner import run

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "metrics.md").read_text()
ALERTS = ROOT / "packaging" / "alerts.yml"
DASHBOARD = ROOT / "packaging" / "grafana-dashboard.json"
KiB = 1024

pytestmark = pytest.mark.volumes(vm=1 << 20, mv=1 << 20)


def scrape(node: Node, rows: Callable[[], list[VolumeStatus]] | None = None) -> str:
    reg = metrics.registry(node, rows or (lambda: node_statuses(node)))
    return metrics.render(reg).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def promtool() -> str:
    """promtool (Debian's prometheus package, which scripts/_bootstrap installs); no skip."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (scripts/_bootstrap does)")
    return path


def full_rows(node: Node) -> list[VolumeStatus]:
    """The node's rows, with every field that is sometimes absent set and a mirror under the
    primary's row: a scrape of these has a sample of every family."""
    rows = node_statuses(node)
    peer = PeerStatus(node="n2", state=VolumeState.FETCH_PAUSED, connected=True, fetched_lsn=1, replayed_lsn=1,
                      fetch_paused=True, replay_paused=False, lag_bytes=4096, lag_records=1, lag_seconds=2.5,
                      last_seen=0.0, dropped=0)
    sync = SyncModeStatus(mirrors=1, timeout=2.0, refuse=False, state=SyncState.DEGRADED, since=1.0, acked_lsn=3,
                          behind_records=2, behind_bytes=KiB, behind_seconds=1.5, degradations=1)
    extra = dict(connected=False, fetch_paused=False, replay_paused=False, progress=0.5, sync_left_bytes=KiB,
                 eta_seconds=3.0, mode=ReplicationMode.SYNC, sync_mode=sync)
    return [r.changed(peers=[peer], **extra) if r.volume == "vm" else r for r in rows]


def test_the_collector_renders_the_status_rows(node: Node) -> None:
    vol = node.volume("vm")
    vol.write(0, b"x" * 4 * KiB)
    vol.write(8 * KiB, b"y" * 4 * KiB)
    vol.flush()
    vol.writeback()
    make_mirror(node, "mv")
    text = scrape(node)
    rows = {r.volume: r for r in node_statuses(node)}
    for name, row in rows.items():
        for metric, _, field in metrics.VOLUME_GAUGES:
            assert value(text, metric, volume=name) == getattr(row, field), (metric, name)
        for state in VolumeState:
            assert value(text, "marsfs_volume_state", volume=name, state=state.value) == (state == row.state)
        for role in Role:
            assert value(text, "marsfs_volume_role", volume=name, role=role.value) == (role == row.role)
        assert value(text, "marsfs_volume_errors", volume=name) == len(row.errors)
    assert rows["vm"].state == VolumeState.UP and rows["mv"].state == VolumeState.CATCHING_UP
    assert value(text, "marsfs_volume_head_lsn", volume="vm") == vol.head_lsn > 0
    assert value(text, "marsfs_log_space_limit_bytes") == node.space.last_limit
    assert value(text, "marsfs_log_space_used_bytes") == sum(r.log_bytes for r in rows.values())
    assert value(text, "marsfs_node_info", node="n1") == 1
    # the core's figures: two writes written back, at least the flush's fdatasync timed
    assert value(text, "marsfs_volume_writeback_bytes_total", volume="vm") == 8 * KiB
    assert value(text, "marsfs_volume_fetched_bytes_total", volume="vm") == 0
    count = value(text, "marsfs_volume_fsync_duration_seconds_count", volume="vm")
    assert count >= 1 and value(text, "marsfs_volume_fsync_duration_seconds_bucket", volume="vm", le="+Inf") == count
    assert value(text, "marsfs_volume_fsync_duration_seconds_sum", volume="vm") > 0
    # a node alone knows nothing of a mirror's connection: left out, not made up
    assert not any(n == "marsfs_volume_connected" for n, _ in samples(text))


def test_the_histogram_buckets_are_cumulative(node: Node) -> None:
    h = node.volume("vm").log.sync_latency
    for seconds in (0.00005, 0.0001, 0.003, 0.003, 20.0):
        h.observe(seconds)
    snap = h.snapshot()
    buckets = dict(snap.buckets)
    assert (buckets[0.0001], buckets[0.0025], buckets[0.005], buckets[10.0], snap.count) == (2, 2, 4, 4, 5)
    assert snap.sum == pytest.approx(20.00615)


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The metric tables of docs/metrics.md: name -> (type, labels)."""
    out = {}
    for m in re.finditer(r"^\| `(marsfs_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", DOC, re.M):
        labels = frozenset(re.findall(r"`([a-z_]+)`", m.group(3)))
        out[m.group(1)] = (m.group(2), labels)
    return out


def test_the_docs_list_every_metric_with_its_type_and_labels(node: Node) -> None:
    reg = metrics.registry(node, lambda: full_rows(node))
    exported: dict[str, tuple[str, frozenset[str]]] = {}
    for fam in reg.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = frozenset(k for s in fam.samples for k in s.labels)
        assert fam.samples, f"{name} has no sample in the full rows"
        exported[name] = (fam.type, labels)
    assert exported == documented()
    text = metrics.render(reg).decode()
    assert text == metrics.render(reg).decode()  # nothing moved in between: the same rows, the same text
    subprocess.run([promtool(), "check", "metrics"], input=text, text=True, check=True, capture_output=True)


def exported_samples(node: Node) -> set[str]:
    reg = metrics.registry(node, lambda: full_rows(node))
    return {s.name for fam in text_string_to_metric_families(metrics.render(reg).decode()) for s in fam.samples}


def test_the_alert_rules_check_and_fire(node: Node, tmp_path: Path) -> None:
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(ALERTS)], text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr
    names = set(re.findall(r"\bmarsfs_[a-z0-9_]+", ALERTS.read_text()))
    assert names and names <= exported_samples(node), names - exported_samples(node)
    # synthetic series, each alert once: promtool evaluates the rules over them
    # the same rules without their annotations (promtool would compare those too)
    bare = tmp_path / "alerts.yml"
    bare.write_text(re.sub(r"^ {8}annotations:\n(?: {10,}.*\n)*", "", ALERTS.read_text(), flags=re.M))
    assert "annotations" not in bare.read_text() and bare.read_text().count("alert:") == 7
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(f"""
rule_files: [{bare}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'marsfs_volume_lag_seconds{{instance="b", volume="vm"}}'
        values: '90x10'
      - series: 'marsfs_volume_role{{instance="b", volume="vm", role="mirror"}}'
        values: '1x10'
      - series: 'marsfs_volume_split_brains{{instance="a", volume="vm"}}'
        values: '0 1x10'
      - series: 'marsfs_volume_state{{instance="a", volume="db", state="failed"}}'
        values: '1x10'
      - series: 'marsfs_log_space_used_bytes{{instance="a"}}'
        values: '90x20'
      - series: 'marsfs_log_space_limit_bytes{{instance="a"}}'
        values: '100x20'
      - series: 'marsfs_volume_sync_degraded{{instance="a", volume="pg"}}'
        values: '0 1x10'
    alert_rule_test:
      - eval_time: 6m
        alertname: MarsfsMirrorLagging
        exp_alerts:
          - exp_labels: {{severity: warning, instance: b, volume: vm}}
      - eval_time: 2m
        alertname: MarsfsSplitBrain
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a, volume: vm}}
      - eval_time: 2m
        alertname: MarsfsVolumeFailed
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a, volume: db, state: failed}}
      - eval_time: 15m
        alertname: MarsfsLogSpaceHigh
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a}}
      - eval_time: 3m
        alertname: MarsfsSyncDegraded
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a, volume: pg}}
""")
    r = subprocess.run([tool, "test", "rules", str(tests)], text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_dashboard_names_only_exported_metrics(node: Node) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    named = {n for e in exprs for n in re.findall(r"\bmarsfs_[a-z0-9_]+", e)}
    have = exported_samples(node)
    assert named and named <= have, sorted(named - have)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ---------------------------------------------------------------------------- HTTP


async def request(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        out = bytearray()
        while chunk := await stream.receive_some(65536):
            out += chunk
        return bytes(out)


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_the_responder_answers_scrapes_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "DEADLINE", 0.5)
    monkeypatch.setattr(metrics, "MAX_CLIENTS", 2)
    body = b"marsfs_node_info{node=\"n1\"} 1.0\n"
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(metrics.serve_metrics, f"127.0.0.1:{port}", lambda: body) == port
            code, headers, got = split(await request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            assert (code, got) == (200, body)
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert headers["Content-Length"] == str(len(body)) and headers["Connection"] == "close"
            assert split(await request(port, b"GET /metrics?x=1 HTTP/1.0\n\n"))[0] == 200
            assert split(await request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))[2] == b""
            assert split(await request(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 404
            assert split(await request(port, b"GET /metricsx HTTP/1.1\r\n\r\n"))[0] == 404
            code, headers, _ = split(await request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
            assert code == 405 and headers["Allow"] == "GET, HEAD"
            assert split(await request(port, b"hello\r\n\r\n"))[0] == 400
            big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * metrics.MAX_REQUEST)
            assert split(await request(port, big))[0] == 431
            # a client that sends nothing holds one slot until its deadline, then is closed;
            # scrapes meanwhile are answered, and one more client than the slots is refused
            async with await trio.open_tcp_stream("127.0.0.1", port) as slow:
                await trio.sleep(0.05)
                assert split(await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
                async with await trio.open_tcp_stream("127.0.0.1", port) as slow2:
                    await trio.sleep(0.05)
                    assert split(await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 503
                    assert await slow2.receive_some(100) == b""
                assert await slow.receive_some(100) == b""  # closed by the server, nothing sent
            assert split(await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
            nursery.cancel_scope.cancel()

    run(main, limit=30, autojump=None)


@pytest.mark.allow_log("rendering the metrics failed")
def test_a_render_that_fails_is_a_500_and_the_responder_goes_on() -> None:
    port = free_port()
    calls: list[int] = []

    def body() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return b"ok\n"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics.serve_metrics, f"127.0.0.1:{port}", body)
            assert split(await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
            assert split(await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[2] == b"ok\n"
            nursery.cancel_scope.cancel()

    run(main, limit=30, autojump=None)


def test_a_port_in_use_is_one_line() -> None:
    port = free_port()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics.serve_metrics, f"127.0.0.1:{port}", lambda: b"")
            with pytest.raises(MarsError, match=f"cannot listen for metrics scrapes on 127.0.0.1:{port}"):
                await nursery.start(metrics.serve_metrics, f"127.0.0.1:{port}", lambda: b"")
            nursery.cancel_scope.cancel()

    run(main, limit=30, autojump=None)

