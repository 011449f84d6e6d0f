"""Unit tests of flushctl_milter."""
