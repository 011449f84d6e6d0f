"""The milter: tags each message with its customer domain, records it in the
ledger, enforces quotas and recipient lists (rules: pure decisions; app: pymilter glue).

Its import name is not `milter`: pymilter's C module owns that name."""
