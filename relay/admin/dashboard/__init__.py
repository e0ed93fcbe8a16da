"""The web dashboard under ``/ui/`` (issue 19): sign-in, overview, links and click map,
messages. relay/admin/dashboard/app.py builds it."""
