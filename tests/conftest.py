"""Workspace-wide test configuration; the fixtures themselves come from beampipe's pytest plugin."""

pytest_plugins = ["pytester"]
