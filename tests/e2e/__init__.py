"""End-to-end tests: the relay as users run it, real clients, a real upstream."""
