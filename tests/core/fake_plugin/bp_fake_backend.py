"""An ophyd-async backend for the registry tests; it only has to be recognisable."""

from __future__ import annotations

from typing import Any

from beampipe import BatchedSignalBackend


class FakeCaBackend(BatchedSignalBackend[Any]):
    protocol = "ca"

    async def connect(self, timeout: float) -> None:
        raise NotImplementedError

    async def put(self, value: Any) -> None:
        raise NotImplementedError

    async def get_datakey(self, source: str) -> Any:
        raise NotImplementedError

    async def get_reading(self) -> Any:
        raise NotImplementedError

    async def get_value(self) -> Any:
        raise NotImplementedError

    async def get_setpoint(self) -> Any:
        raise NotImplementedError

    def set_callback(self, callback: Any) -> None:
        raise NotImplementedError


class NotABackend:
    protocol = "ca"
