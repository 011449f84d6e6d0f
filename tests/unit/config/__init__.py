"""Unit tests of flushctl.config."""
