"""Unit tests of flushctl.cli."""
