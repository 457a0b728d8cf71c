"""The volume: base image + log + extent index, writeback and read-only versions."""

from marsfs.volume.index import ExtentIndex
from marsfs.volume.volume import SYNC_INTERVAL, VersionInfo, Volume, VolumeView

__all__ = ["SYNC_INTERVAL", "ExtentIndex", "VersionInfo", "Volume", "VolumeView"]
