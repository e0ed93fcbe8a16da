"""Tests of relay/store/."""
