"""Unit tests of flushctl.gateway."""
