"""Everything that touches Postfix: its commands, its queue files, the
settings plan and `flushctl apply`, and routing as Postfix does it."""
