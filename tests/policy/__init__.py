"""Tests of relay/policy/."""
