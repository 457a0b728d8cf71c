"""The faces: how the world reaches a node.

* ``namespace``: what the mounted tree looks like (names, inodes, lookup counts, attributes); pure.
* ``fuse``: the pyfuse3 adapter over the namespace and the node.
* ``commands``: the one table of control commands, read by the command line and the daemon.
* ``control``: the control socket that carries those commands, and ``call`` for clients.
* ``config``: ``marsfs serve``'s configuration and start-up checks.
* ``daemon``: the running node (FUSE main loop, cluster, control socket, signals, tuning).
"""
