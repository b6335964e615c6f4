"""Metrics: what the CLI, the runner and the operator export about refreshes."""
