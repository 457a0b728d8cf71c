"""Cluster metadata gossip over the node-to-node channel (want ``meta``, protocol 3).

Rules that hold here:

* One exchange is both directions: the client says HELLO and sends its entries, the server
  answers META_WELCOME, merges them and sends its own; the client merges those. Each side
  checks the other's cluster name and refuses entries from another cluster (the server with
  ERROR ``cluster``, the client by dropping the connection unmerged).
* Sizes are bounded on the wire (:data:`~marsfs.replication.protocol.MAX_META_ENTRIES` per
  message, :data:`~marsfs.replication.protocol.MAX_META_FRAMES` messages per side); the
  protocol layer validates every entry, and :func:`marsfs.node.meta.check_entry` again before
  a merge (names inside keys and values too, and a clock at most
  :data:`~marsfs.node.meta.CLOCK_STEP` past ours as the exchange began), so a malformed
  entry refuses the whole message (ProtocolError) and nothing of it is merged.
* A whole exchange takes at most :data:`EXCHANGE_TIMEOUT` seconds.
* Merges write the metadata file: they run in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from marsfs.aio import describe
from marsfs.errors import ProtocolError
from marsfs.node.meta import CLOCK_STEP, ClusterMeta, Entry, check_entry
from marsfs.replication.channel import Channel, PeerRefused
from marsfs.replication.protocol import (
    MAX_META_ENTRIES,
    MAX_META_FRAMES,
    PROTO_VERSION,
    Error,
    Hello,
    MetaEntries,
    MetaWelcome,
)

logger = logging.getLogger(__name__)

EXCHANGE_TIMEOUT = 5.0

Changed = set[tuple[str, str]]


async def send_entries(ch: Channel, meta: ClusterMeta) -> None:
    """All of our entries, in as many META_ENTRIES as it takes (the last has ``more`` false)."""
    wire = [e.to_wire() for e in meta.entries()]
    chunks = [wire[i:i + MAX_META_ENTRIES] for i in range(0, len(wire), MAX_META_ENTRIES)] or [[]]
    if len(chunks) > MAX_META_FRAMES:
        logger.warning("cluster metadata holds %d entries, more than %d can be sent; sending the newest",
                       len(wire), MAX_META_ENTRIES * MAX_META_FRAMES)
        chunks = chunks[-MAX_META_FRAMES:]
    for i, chunk in enumerate(chunks):
        await ch.send_message(MetaEntries(entries=tuple(chunk), more=i < len(chunks) - 1))


async def receive_entries(ch: Channel, peer: str, clock: int) -> list[Entry]:
    """The peer's entries until one META_ENTRIES says no more; ProtocolError for anything else
    (also for a clock more than CLOCK_STEP past ``clock``, ours as the exchange began)."""
    ceiling = clock + CLOCK_STEP
    out: list[Entry] = []
    for _ in range(MAX_META_FRAMES):
        msg = await ch.receive_message()
        if isinstance(msg, Error):
            raise PeerRefused(msg.code, msg.error)
        if not isinstance(msg, MetaEntries):
            raise ProtocolError(f"{type(msg).__name__.upper()} from {peer} during a metadata exchange")
        for owner, key, clock, value in msg.entries:
            why = check_entry(owner, key, clock, value, ceiling=ceiling)
            if why is not None:
                raise ProtocolError(f"META_ENTRIES from {peer}: {why}")
            out.append(Entry.from_wire((owner, key, clock, value)))
        if not msg.more:
            return out
    raise ProtocolError(f"META_ENTRIES from {peer}: more than {MAX_META_FRAMES} messages")


async def serve(ch: Channel, hello: Hello, meta: ClusterMeta, cluster: str) -> Changed:
    """Answer a metadata exchange a peer opened with ``hello``; returns what changed here."""
    if hello.proto != PROTO_VERSION:
        await ch.send_message(Error(code="protocol", error=f"node {meta.node} speaks protocol {PROTO_VERSION}"))
        return set()
    if hello.cluster != cluster:
        await ch.send_message(Error(code="cluster", error=f"node {meta.node} is in cluster {cluster!r}, "
                                                          f"not {hello.cluster!r}"))
        logger.info("refused metadata from %s: it is in cluster %r, not %r", hello.node, hello.cluster, cluster)
        return set()
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT):
            await ch.send_message(MetaWelcome(node=meta.node, cluster=cluster))
            theirs = await receive_entries(ch, hello.node, meta.clock)
            changed = await trio.to_thread.run_sync(meta.merge, theirs)
            await send_entries(ch, meta)
    except (trio.TooSlowError, PeerRefused) as e:
        logger.info("metadata exchange with %s ended: %s", hello.node, describe(e))
        return set()
    return changed


async def exchange(connect: Callable[[], Awaitable[trio.abc.Stream]], meta: ClusterMeta, cluster: str,
                   peer: str, *, node_id: str = "") -> Changed:
    """One exchange with ``peer`` (both directions), saying this node's id ``node_id`` in the
    HELLO; returns what changed here. Raises
    OSError, trio.TooSlowError, ConnectionLost, ProtocolError or PeerRefused."""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        stream = await connect()
        ch = Channel(stream)
        try:
            await ch.send_message(Hello(proto=PROTO_VERSION, cluster=cluster, node=meta.node, volume="",
                                        want="meta", epoch=0, node_id=node_id))
            welcome = await ch.receive_message()
            if isinstance(welcome, Error):
                raise PeerRefused(welcome.code, welcome.error)
            if not isinstance(welcome, MetaWelcome):
                raise ProtocolError(f"{type(welcome).__name__.upper()} from {peer} instead of META_WELCOME")
            if welcome.cluster != cluster:
                raise PeerRefused("cluster", f"node {welcome.node} is in cluster {welcome.cluster!r}, not {cluster!r}")
            await send_entries(ch, meta)
            theirs = await receive_entries(ch, peer, meta.clock)
        finally:
            await ch.aclose()
    return await trio.to_thread.run_sync(meta.merge, theirs)
