"""The HTTP API and the relay CLI: one module per concept holding its routes and its commands,
listed once in :mod:`relay.admin.concepts`, which feeds both. The rules they apply are pure, in
relay/policy/; the SQL they run is in relay/store/."""
