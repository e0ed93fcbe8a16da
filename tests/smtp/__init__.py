"""Tests of relay/smtp/."""
