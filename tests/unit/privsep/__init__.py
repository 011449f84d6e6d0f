"""Unit tests of flushctl.privsep."""
