"""Unit tests of flushctl.protocols."""
