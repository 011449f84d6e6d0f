"""The ledger: which queued message belongs to which customer domain.

An SQLite database in WAL mode under the state directory.  The milter adds
one row per held message before it lets Postfix accept the message; the
rows are an index into Postfix's queue, not a copy of it: every read that
must be exact checks the queue file itself (see ``queuefiles``), and rows
whose message is gone are pruned.  Per-domain totals are kept beside the
rows in the same transaction, so a quota check is one row read.

WAL with ``synchronous=NORMAL`` survives any crash of our processes; after
a power loss the newest rows may be missing, which is what rebuilding from
the queue's tag headers is for.

Modules, each with one job:

- ``schema``: the file's name, its tables and their migrations, the row types;
- ``sharing``: the state directory shared with the milter's group, and the
  filesystem identity a root process takes in it;
- ``connection``: the file and its one connection (open, set aside when
  corrupt, reopen when replaced, transactions);
- ``records``: held messages' rows;
- ``domains``: per-domain state (totals, pauses, releases, probes, backoff);
- ``counters``: event counters that outlive any process;
- ``forwards``: releases still to be sent on to the cluster's peers;
- ``foreign``: held mail that is not ours, judged once per config;
- ``notices``: when each domain's notices went out, and the webhook's deliveries;
- ``history``: held messages per domain, hour by hour, for a week (the portal's chart);
- ``store``: ``Ledger``, all of these on one connection.
"""
