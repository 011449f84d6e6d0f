"""The reachability poller: its loop and the prober that decides where a
domain's mail would go and whether that server answers."""
