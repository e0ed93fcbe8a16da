"""The mail path: SMTP server, pipeline, retries, Received line, the upstream pool."""
