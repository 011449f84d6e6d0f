"""Unit tests of flushctl.heldmail."""
