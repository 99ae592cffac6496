"""Backends: a pure render(spec) -> files, and thin submit/status/logs/cancel around it."""
