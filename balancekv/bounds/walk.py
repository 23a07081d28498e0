"""Bounds for the walk results (see proofs/). Filled in by the walk issue."""
__all__: list[str] = []
