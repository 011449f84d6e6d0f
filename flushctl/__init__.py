"""flushctl: SMTP-on-demand for Postfix."""

__version__ = "0.1.0"
