"""The transaction log: record codec (``record``), segment files (``segment``), opening and
verifying them (``recovery``), and the Log with its one append path (``log``)."""

from marsfs.log.log import DEFAULT_SEGMENT_BYTES, Log, SyncLead, io_error
from marsfs.log.record import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    SEGMENT_HEADER_SIZE,
    Payload,
    RecordType,
    encode_payload,
    genesis_chain,
)
from marsfs.log.recovery import RecoveryReport
from marsfs.log.segment import RecordInfo

__all__ = [
    "DEFAULT_SEGMENT_BYTES", "HEADER_SIZE", "MAX_PAYLOAD", "SEGMENT_HEADER_SIZE", "Log", "Payload",
    "RecordInfo", "RecordType", "RecoveryReport", "SyncLead", "encode_payload", "genesis_chain", "io_error",
]
