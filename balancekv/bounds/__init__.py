"""Every theorem's bound as one function, called by the tests, ``proofs/`` and ``guarantee="theorem"``.

A constant is stated once, here; ``proofs/README.md`` indexes each function
with its source and the test that checks it.
"""

from .balance import *  # noqa: F403
from .quantization import *  # noqa: F403
from .subgen import *  # noqa: F403
from .walk import *  # noqa: F403
