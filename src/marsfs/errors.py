"""Errors as data: each class carries what the user should do and the exit status.

Every error a user (or the world) can cause is a :class:`MarsError` subclass whose message
says what happened and what to do. Internal invariants are plain ``assert`` statements;
an ``AssertionError`` is a bug in marsfs, never a user mistake.
"""

from __future__ import annotations


class MarsError(Exception):
    """Base of all errors marsfs reports to users: one line, exit status 1."""

    exit_code: int = 1


class UsageError(MarsError):
    """The command line itself is wrong (exit status 2, like argparse)."""

    exit_code = 2


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


class VolumeError(MarsError):
    """A request a volume cannot serve: out of range, unknown version, read-only and so on."""


class StateError(MarsError):
    """A volume's files on disk are inconsistent with each other."""
