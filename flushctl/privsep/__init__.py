"""Privilege separation: the root release helper, binding and dropping root,
and the wire between the helper and the unprivileged daemons."""
