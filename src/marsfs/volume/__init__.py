"""The volume: base image + log + extent index (``volume``, ``index``), writeback with crash
redo (``writeback``), views and their shared indexes (``views``), versions and their names
(``versions``), the history window (``retention``), clones (``clone``), resyncs to another
node's version (``resync``), the lz4 policy (``encoding``), the holds ledger of mirror
positions and change sets (``holds``, ``changes``), the size history (``sizes``) and the
standing disk failures (``faults``)."""

from marsfs.volume.clone import CloneLink
from marsfs.volume.index import ExtentIndex
from marsfs.volume.resync import Resync
from marsfs.volume.retention import DEFAULT_HISTORY_BYTES, Retention
from marsfs.volume.versions import VersionInfo
from marsfs.volume.views import VolumeView
from marsfs.volume.volume import SYNC_INTERVAL, Volume

__all__ = ["DEFAULT_HISTORY_BYTES", "SYNC_INTERVAL", "CloneLink", "ExtentIndex", "Resync", "Retention", "VersionInfo",
           "Volume", "VolumeView"]
