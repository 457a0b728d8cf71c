"""The transaction log: record codec (``record``) and segment files with recovery (``log``)."""

from marsfs.log.log import DEFAULT_SEGMENT_BYTES, Log, RecordInfo, RecoveryReport
from marsfs.log.record import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    SEGMENT_HEADER_SIZE,
    Payload,
    RecordType,
    encode_payload,
    genesis_chain,
)

__all__ = [
    "DEFAULT_SEGMENT_BYTES", "HEADER_SIZE", "MAX_PAYLOAD", "SEGMENT_HEADER_SIZE", "Log", "Payload",
    "RecordInfo", "RecordType", "RecoveryReport", "encode_payload", "genesis_chain",
]
