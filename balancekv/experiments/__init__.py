"""The commands behind ``balancekv demo``, ``balancekv reproduce ...`` and ``balancekv eval``.

``demo``; ``fig1`` (with ``middle`` and ``real_data``); ``bounds_table``; ``eval``: ``evaluate``
runs ``eval_runners`` and writes through ``eval_report`` (``eval_tables``, ``eval_plots``);
``results`` (run folders, deterministic result files) and ``plotstyle`` (one look for every plot)
are shared.
"""
