"""The customers' web portal: ``flushctl portal`` (``app``, ``daemon``) and
the release helper's side of it (``authority``)."""
