"""Reproduction scripts behind ``balancekv reproduce ...`` and ``balancekv demo``."""
