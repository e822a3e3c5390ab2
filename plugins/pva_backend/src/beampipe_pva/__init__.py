"""Batched pvAccess for ophyd and ophyd-async over p4p, with every NT type including NTNDArray as numpy."""

__all__: list[str] = []
