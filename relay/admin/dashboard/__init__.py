"""The web dashboard under ``/ui/`` (README, "Dashboard"): sign-in, overview, links and click map,
messages. relay/admin/dashboard/app.py builds it."""
