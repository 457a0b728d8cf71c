"""The service manager's readiness protocol (``sd_notify(3)``), for ``Type=notify`` units.

systemd gives a ``Type=notify`` service the address of a unix datagram socket in
``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``); the service sends
newline-separated ``KEY=VALUE`` lines there: ``READY=1`` once it serves, ``STOPPING=1`` when
its stop begins, ``STATUS=...`` for ``systemctl status``. A few lines of socket code, so no
package for it.

What holds:

* Without ``$NOTIFY_SOCKET`` (not under systemd, or a unit of another type) every call is a
  no-op.
* ``READY=1`` and ``STOPPING=1`` are each sent at most once, whatever the callers do.
* Notifying never ends or blocks the daemon: the socket is non-blocking, and a message the
  manager cannot take (gone, queue full) is logged at debug level and dropped; systemd then
  sees the daemon as it would without the message (a start that times out, say).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends ``sd_notify`` messages to the socket named by ``NOTIFY_SOCKET`` in ``environ``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        #: where messages go (an abstract name starts with a NUL byte); "" sends nothing
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sent: set[str] = set()  # READY=1 / STOPPING=1 once sent

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (``KEY=VALUE``) as one datagram; no-op without a socket."""
        if not self.address or not lines:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.connect(self.address)
                s.send("\n".join(lines).encode())
        except OSError as e:
            logger.debug("could not notify the service manager at %r: %s", self.address, e)

    def _once(self, line: str, status: str) -> None:
        if line in self._sent:
            self.notify(f"STATUS={status}")
            return
        self._sent.add(line)
        self.notify(line, f"STATUS={status}")

    def status(self, text: str) -> None:
        """What ``systemctl status`` shows as the service's status line."""
        self.notify(f"STATUS={text}")

    def ready(self, status: str) -> None:
        """The service serves (sent once; later calls update the status only)."""
        self._once("READY=1", status)

    def stopping(self, status: str) -> None:
        """The stop began (sent once; later calls update the status only)."""
        self._once("STOPPING=1", status)
