"""Peers measured beside beampipe that cannot share the dev venv; see docs/benchmark_peers.md."""
