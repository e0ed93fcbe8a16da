"""Tests of relay/tracking/."""
