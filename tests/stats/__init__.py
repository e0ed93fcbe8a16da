"""Tests of relay/stats/."""
