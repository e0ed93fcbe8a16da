"""Tracking relay: an SMTP relay that adds open and click tracking to outgoing mail."""

__version__ = "0.1.0"
