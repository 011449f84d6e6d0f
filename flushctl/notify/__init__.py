"""Telling customers about their held mail: which notices are due (``rules``),
their words (``messages``), sending them and remembering it (``notifier``),
the webhook's signed deliveries (``webhook``)."""
