"""Bounds for the quantization results (see proofs/). Filled in by the quantization issue."""
__all__: list[str] = []
