"""When a volume tries lz4 on the data it writes: an adaptive backoff.

Rules that hold here:

* lz4 is only a size optimisation: a record is stored compressed when that saves at least
  1/:data:`LZ4_MIN_SAVING` of it (:func:`marsfs.log.record.encode_payload` decides per
  record), and a skipped attempt only stores a compressible record uncompressed. Correctness
  never depends on this policy.
* A smaller saving is not worth it: every read and the writeback of a compressed record
  decompress it, an uncompressed one is read (and written back) as it is, and shipping
  compresses RECORDS frames anyway (:mod:`marsfs.replication.protocol`). fio's default data,
  for one, shrinks by about 4 %: compressing it cost the daemon about 29 % of its CPU under
  1 MiB writes (measured with perf).
* After an attempt that did not save enough, the next 1, 2, 4, ... up to
  :data:`LZ4_MAX_SKIP` records skip the attempt; any attempt that saved enough resets it.
  Random data costs an lz4 pass per record for nothing (~11 us per 64 KiB, plus a GIL release
  and re-acquire); compressible data after such a run is stored uncompressed for at most that
  many records.
* Writers call :meth:`Lz4Policy.encode` outside any lock. Concurrent writers may race on the
  two counters, which only changes how many records skip the attempt.
"""

from __future__ import annotations

from marsfs.log.record import MIN_COMPRESS, Flags, Payload, encode_payload

LZ4_MAX_SKIP = 64
#: a record is stored compressed only when lz4 saves at least 1/LZ4_MIN_SAVING of its bytes
LZ4_MIN_SAVING = 8


class Lz4Policy:
    """The backoff state of one volume's writers."""

    __slots__ = ("_skip", "_backoff")

    def __init__(self) -> None:
        self._skip = 0  # records still to store without trying lz4
        self._backoff = 0  # how many the next failed attempt makes skip (0: none failed)

    def encode(self, chunk: bytes | memoryview) -> Payload:
        """encode_payload, trying lz4 unless recent attempts did not save enough."""
        if self._skip > 0:
            self._skip -= 1
            return encode_payload(chunk, compress=False)
        n = len(chunk)
        payload = encode_payload(chunk, max_stored=n - n // LZ4_MIN_SAVING)
        if payload.flags & Flags.LZ4 or len(chunk) < MIN_COMPRESS:
            self._backoff = 0
        else:
            self._backoff = min(LZ4_MAX_SKIP, self._backoff * 2 or 1)
            self._skip = self._backoff
        return payload
