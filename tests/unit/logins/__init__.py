"""Unit tests of flushctl.logins."""
