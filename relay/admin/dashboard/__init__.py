"""The web dashboard under ``/ui/`` (README, "Dashboard"): sign-in, overview, links and click
maps, messages, where and how, operations. relay/admin/dashboard/app.py builds it."""
