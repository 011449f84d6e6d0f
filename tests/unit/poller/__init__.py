"""Unit tests of flushctl.poller."""
