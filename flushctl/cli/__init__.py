"""The `flushctl` command line: the click group is ``flushctl.cli.main.main``."""
