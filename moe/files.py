"""The ground floor's file helpers (imports nothing of floe): what every room that writes files shares."""
from __future__ import annotations

import os


def readable_as_umask(path: str) -> None:
    """Give a file the mode a plain open() would (0666 less the umask: 0644 by default). safetensors
    writes 0600, which a serving user or a teammate in the group cannot read."""
    mask = os.umask(0)
    os.umask(mask)  # NOTE: reading the umask means setting it; set straight back (no threads write files here)
    os.chmod(path, 0o666 & ~mask)
