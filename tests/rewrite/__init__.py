"""Tests of relay/rewrite/."""
