"""Errors as data: each class carries its exit status and the errno the kernel should see.

Rules that hold here:

* Every failure a user (or the world: a full disk, a peer that went away) can cause is a
  :class:`MarsError` subclass whose message says what happened and what to do. The class says
  how it leaves marsfs: ``exit_code`` for the command line, ``errno`` for the FUSE face (a full
  disk reaches the application as ENOSPC, a write to a mirror as EROFS, damage as EIO).
* Internal invariants are plain ``assert`` statements. An ``AssertionError`` is a bug in
  marsfs, never a user mistake, and nothing catches it as control flow.
* Pick the most specific class; a new kind of user-facing failure gets its own class here, so
  that faces never guess an errno from a message.

This module sits below every layer; it imports nothing from marsfs.
"""

from __future__ import annotations

import errno as _errno


class MarsError(Exception):
    """Base of all errors marsfs reports to users: one line, exit status 1, EIO in FUSE."""

    exit_code: int = 1
    errno: int = _errno.EIO


class UsageError(MarsError):
    """The command line itself is wrong (exit status 2, like argparse)."""

    exit_code = 2
    errno = _errno.EINVAL


class InvalidRequest(MarsError):
    """A well-formed command whose value is not acceptable: a bad name, size, mark or address."""

    errno = _errno.EINVAL


class NoSpace(MarsError):
    """The state directory's filesystem has no room for what had to be written (ENOSPC)."""

    errno = _errno.ENOSPC


class LogDamaged(MarsError):
    """A record before the tail of the log failed verification.

    Recovery stops right there; nothing after it is applied. The message names segment,
    byte offset and LSN so that an operator can inspect the file.
    """

    def __init__(self, segment: str, offset: int, lsn: int, reason: str) -> None:
        self.segment = segment
        self.offset = offset
        self.lsn = lsn
        self.reason = reason
        super().__init__(
            f"log damaged in segment {segment} at byte {offset} (LSN {lsn}): {reason}; "
            "nothing from there on was applied. Keep the state directory for inspection and "
            "resync this volume from a healthy node (marsfs invalidate)"
        )


class LogFailed(MarsError):
    """Writing or syncing the log failed; the log refuses further writes.

    After a failed fdatasync the kernel may have dropped dirty pages, so continuing would risk
    acknowledging writes that are gone. The daemon must be restarted (recovery re-verifies).
    """


class StateError(MarsError):
    """A volume's files on disk are inconsistent with each other, or missing."""


class VolumeError(MarsError):
    """A request a volume cannot serve. Prefer a subclass: it carries the right errno."""


class VolumeNotFound(VolumeError):
    """No such volume on this node."""

    errno = _errno.ENOENT


class VolumeExists(VolumeError):
    """A volume of that name is already on this node."""

    errno = _errno.EEXIST


class VolumeBusy(VolumeError):
    """The volume is open (a loop device, a mount) or otherwise in use."""

    errno = _errno.EBUSY


class VolumeReadOnly(VolumeError):
    """A write to a mirror or to a version: only the primary's image is writable."""

    errno = _errno.EROFS


class OutOfRange(VolumeError):
    """A range outside the volume: a disk answers a write past its end with ENOSPC."""

    errno = _errno.ENOSPC


class VersionNotFound(VolumeError):
    """The named version is not (or no longer) retained."""

    errno = _errno.ENOENT


class WrongRole(VolumeError):
    """The command does not apply to the volume's role on this node (e.g. a mirror-only command
    on a primary); the message names the node to run it on or the command to use instead."""

    errno = _errno.EINVAL


class NodeError(MarsError):
    """A node-level refusal: names, ownership of the state directory, roles."""


class PeerError(NodeError):
    """A peer is unknown, unreachable or refused what this node asked."""

    errno = _errno.EHOSTUNREACH


class RecordRefused(MarsError):
    """A replicated record that does not verify, does not continue this log, or does not fit
    the volume: the mirror keeps its log as it was and needs a resync from a healthy node."""


class DaemonNotRunning(MarsError):
    """No daemon answers on the state directory's control socket."""


class DaemonWentAway(MarsError):
    """The daemon closed the control connection before it answered (it died or was stopped):
    whether the command took effect is not known from here."""


class DaemonRefused(MarsError):
    """The node's daemon refused a control command; the message is the daemon's own words.

    The control socket carries only a message and an exit status, so the command line rebuilds
    the refusal as this class (exit status 1) or :class:`DaemonRejectedUsage` (exit status 2).
    """


class DaemonRejectedUsage(DaemonRefused):
    """The daemon found the request itself wrong: unknown command, missing or ill-typed arguments."""

    exit_code = 2
    errno = _errno.EINVAL


class ProtocolError(PeerError):
    """A peer sent what the replication protocol does not allow: a damaged frame, a malformed
    or out-of-order message. The connection is dropped; the fetch resumes from the last good LSN."""

    errno = _errno.EPROTO


class NotAvailable(MarsError):
    """A command that is planned but not implemented yet: one line naming what it will do,
    exit status 2 like any command the command line cannot run."""

    exit_code = 2
    errno = _errno.ENOSYS


class NodeStopping(NodeError):
    """The daemon was told to stop and waits for open volumes to close: new opens are refused."""

    errno = _errno.EBUSY


class DiskFailed(MarsError):
    """The state directory's disk failed an I/O outside the log (EIO on a volume's base image
    or its state files). Nothing is lost: what failed is retried from the log, which still
    holds it; the message says to check the disk."""


class SyncRefused(MarsError):
    """A flush of a sync volume that refuses to run degraded (``--refuse``) while fewer than N
    mirrors acknowledge: EIO to the application, which must not take its data as replicated."""
