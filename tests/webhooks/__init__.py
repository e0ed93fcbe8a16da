"""Tests of relay/webhooks/."""
