"""bluesky <-> zocalo: RunEngine callback, zocalo.service services and an ophyd-async results device."""

__all__: list[str] = []
