"""Webhooks: payloads and signatures (pure), the outbox and its delivery worker."""
