"""The HTTP API and the relay CLI: one module per concept, its routes and commands."""
