"""``fdatasync`` without a thread: Linux AIO's ``IOCB_CMD_FDSYNC``, completion on an eventfd.

Why: an application's fsync reaches the daemon on its trio thread, which must not block on
the disk. Handing the fdatasync to a worker thread and back cost ~150 µs of CPU per fsync on
the 2-core VM (two wake-ups, the GIL passed back and forth, trio's thread cache), more than the
fdatasync itself; submitted here, the kernel runs it in its own worker and the trio thread
only waits until the eventfd is readable (docs/benchmarks.md, "The primary's write path").

Rules that hold here:

* The kernel's AIO fdsync is ``vfs_fsync(file, datasync=1)``: the same call, the same
  durability and the same error reporting as ``os.fdatasync`` on that fd. Its result is 0 or
  a negative errno, which :meth:`FdatasyncAio.reap` returns as a positive errno.
* One :class:`FdatasyncAio` has at most one fdatasync in flight (its owner, the log's group
  commit leader, guarantees that); :meth:`submit` raises :class:`OSError` when the kernel
  refuses (no AIO, ``aio-max-nr`` reached, a filesystem without it): the caller then uses
  ``os.fdatasync`` in a thread, and nothing was started.
* Raw syscalls through ctypes (x86-64 and arm64 numbers); the structs are the kernel ABI of
  ``linux/aio_abi.h`` (64-byte ``iocb``, 32-byte ``io_event``), little-endian field order.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

#: (io_setup, io_destroy, io_getevents, io_submit) per machine
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2), "arm64": (0, 1, 4, 2)}
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1


class _Iocb(ctypes.Structure):
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32),
                ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


assert ctypes.sizeof(_Iocb) == 64 and ctypes.sizeof(_IoEvent) == 32


class FdatasyncAio:
    """An AIO context for one fdatasync at a time; its eventfd (:meth:`fileno`) turns readable
    when the fdatasync completed. Raises :class:`OSError` when AIO is not available here."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, f"no AIO syscall numbers for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._ctx = ctypes.c_ulong(0)
        self._call(self._setup, ctypes.c_long(1), ctypes.byref(self._ctx))
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            self._libc.syscall(ctypes.c_long(self._destroy), self._ctx)
            raise
        self._iocb = _Iocb(aio_lio_opcode=_IOCB_CMD_FDSYNC, aio_flags=_IOCB_FLAG_RESFD, aio_resfd=self._efd)
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = (_IoEvent * 1)()
        self._no_wait = (ctypes.c_long * 2)(0, 0)  # a zero timespec: io_getevents does not block
        self._pending = False

    def _call(self, number: int, *args: object) -> int:
        r = int(self._libc.syscall(ctypes.c_long(number), *args))
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return r

    def fileno(self) -> int:
        """The eventfd to wait on (readable once the submitted fdatasync completed)."""
        return self._efd

    @property
    def pending(self) -> bool:
        return self._pending

    def submit(self, fd: int) -> None:
        """Start ``fdatasync(fd)``; OSError (nothing started) when the kernel refuses."""
        assert not self._pending, "one fdatasync at a time"
        self._iocb.aio_fildes = fd
        if self._call(self._submit, self._ctx, ctypes.c_long(1), self._iocbs) != 1:
            raise OSError(errno.EAGAIN, "io_submit took no request")
        self._pending = True

    def reap(self, *, block: bool = False) -> int | None:
        """The submitted fdatasync's result if it completed (0, or the errno it failed with),
        None while it runs; with ``block``, waits for it (and never returns None).

        The eventfd is only a wake-up: its count is drained here and the completion is taken
        from io_getevents (a stale count finds no event: None). A blocking reap signals the
        eventfd again after it took the event, so that a task parked on the eventfd for this
        request always wakes (and finds it finished). A signal that interrupts the wait (EINTR:
        the kernel never restarts io_getevents) does not end it: the request is still in flight.
        """
        assert self._pending
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            if not block:
                return None
        while True:
            try:
                n = self._call(self._getevents, self._ctx, ctypes.c_long(1 if block else 0), ctypes.c_long(1),
                               self._event, None if block else self._no_wait)
            except InterruptedError:  # a signal (io_getevents is never restarted): still in flight
                if block:
                    continue
                return None
            if n == 1:
                break
            if not block:
                return None
        self._pending = False
        if block:
            os.eventfd_write(self._efd, 1)
        return -int(self._event[0].res) if self._event[0].res < 0 else 0

    def close(self) -> None:
        """Release the context (io_destroy waits for an fdatasync still in flight)."""
        if self._efd >= 0:
            self._libc.syscall(ctypes.c_long(self._destroy), self._ctx)
            os.close(self._efd)
            self._efd = -1
