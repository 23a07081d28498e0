"""Bounds for the subgen results (see proofs/). Filled in by the subgen issue."""
__all__: list[str] = []
