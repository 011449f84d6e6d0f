"""The library of held mail: what is held per domain, releasing it, taking in
what arrived by other paths, holding back what failed, the ledger that counts it."""
