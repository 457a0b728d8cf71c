"""Test kit shipped with marsfs: baseline filesystems, fixtures helpers."""
