"""The volume: base image + log + extent index (``volume``, ``index``), writeback with crash
redo (``writeback``), versions and their names (``versions``), the lz4 policy (``encoding``)."""

from marsfs.volume.index import ExtentIndex
from marsfs.volume.versions import VersionInfo
from marsfs.volume.volume import SYNC_INTERVAL, Volume, VolumeView

__all__ = ["SYNC_INTERVAL", "ExtentIndex", "VersionInfo", "Volume", "VolumeView"]
