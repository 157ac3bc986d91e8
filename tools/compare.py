"""Compare training runs: a table (final and best metrics, the config keys that differ) and plots.

The command line of floe.run.compare (what it reads and writes: its docstring, or --help); the end of a
`-m` sweep (launch/callbacks.py) calls the same code.
"""
from __future__ import annotations

import sys

from floe.run.compare import main

if __name__ == "__main__":
    sys.exit(main())
