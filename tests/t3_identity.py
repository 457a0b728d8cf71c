"""Node identity between in-process nodes (MemNet): the gate refuses before anything is done.

* A second node that claims a running mirror's name (another node id) is refused, whatever it
  asks: its ``leave`` does not remove the real mirror's hold or peer line, its fast sync does
  not replace them.
* A node in no peer list is refused with ``unknown-node`` and gets no copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import hello, open_channel
from marsfs.replication.protocol import Want
from marsfs.testing.memnet import CLUSTER, SIZE, MemNet, in_net, write
from marsfs.testing.runner import wait_for
from marsfs.volume.holds import mirror_hold

IMPOSTOR = "f" * 32


@pytest.mark.allow_log("refused a connection from")
def test_a_second_node_of_a_name_and_an_unlisted_node_change_nothing(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a = await net.start("a", ["a", "b"])
        b = await net.start("b", ["a", "b"])
        vol = a.node.create("vm", SIZE, thin=True)
        write(vol, 1, 20)
        await b.join("vm", "a")
        await wait_for(lambda: "vm" in b.node.volumes and b.node.volumes["vm"].replayed_lsn == vol.durable_lsn,
                       "b to sync")
        await wait_for(lambda: vol.holds.get(mirror_hold("b")) == vol.durable_lsn
                       and all(p.connected for p in a.peer_table.for_volume("vm", vol.uuid)), "b to fetch")

        async def refused(node: str, node_id: str, want: Want) -> str:
            with pytest.raises(PeerRefused) as e:
                await open_channel(net.connect("a"), hello(node, CLUSTER, "vm", want, node_id=node_id))
            return e.value.code

        for want in ("leave", "sync", "fetch"):
            assert await refused("b", IMPOSTOR, want) == "node-identity"
        assert vol.holds.get(mirror_hold("b")) == vol.durable_lsn
        [row] = a.peer_table.for_volume("vm", vol.uuid)
        assert row.node == "b" and row.connected
        assert await refused("d", IMPOSTOR, "sync") == "unknown-node"
        assert mirror_hold("d") not in vol.holds and len(a.peer_table.for_volume("vm", vol.uuid)) == 1
        # the real b is still welcome (its own id)
        ch, _ = await open_channel(net.connect("a"), hello("b", CLUSTER, "vm", "sums", node_id=b.node.node_id))
        await ch.aclose()

    in_net(tmp_path, body)
