"""Zero-copy shared-memory frame transport between processes on one host, and a broker-less workflows transport."""

__all__: list[str] = []
