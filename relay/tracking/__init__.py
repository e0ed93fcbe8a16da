"""The tracker: HTTP service, tokens and their keyring, bots, enrichment, events."""
