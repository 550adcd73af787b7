"""Acceptance tests: the ``durably`` CLI in real subprocesses, stopped by signals."""
