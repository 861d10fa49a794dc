"""Fixtures for the daemon tests: the public ones from memosd.testing."""

from memosd.testing import memosd_daemon, memosd_daemon_factory

__all__ = ["memosd_daemon", "memosd_daemon_factory"]
