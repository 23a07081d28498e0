"""Bounds for the balance results (see proofs/). Filled in by the balance issue."""
__all__: list[str] = []
