"""Tests of relay/admin/."""
