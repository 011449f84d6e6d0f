"""Unit tests of flushctl.mta."""
