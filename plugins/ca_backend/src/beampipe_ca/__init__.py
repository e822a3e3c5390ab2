"""Batched Channel Access for ophyd and ophyd-async, over libca (pyepics for sync, aioca for async)."""

__all__: list[str] = []
