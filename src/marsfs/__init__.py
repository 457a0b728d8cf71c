"""marsfs: asynchronous log-shipping replication of volume images, in user space.

Layers, lower never importing higher:

    log (records, segments, recovery)
      -> volume (extent index, writeback, versions)
        -> replication (protocol, fetch, sync)
          -> node (daemon, roles, cluster metadata)
            -> faces (pyfuse3 operations, control socket, CLI)

``errors`` sits below all of them: every layer raises the error types defined there.
"""

__version__ = "0.1.0"
