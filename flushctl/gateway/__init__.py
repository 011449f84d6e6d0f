"""The finger/ETRN gateway: listeners, admission rules, reply texts, the
release scheduler, process wiring."""
