"""How every command-line entry point fails on bad input: one message on stderr, exit code 2, no traceback.

    from launch.errors import config_errors
    with config_errors():
        ...   # floe's ConfigError, or Hydra's own composition errors (compose API), end the process here

launch/train.py uses it around training; tools/estimate.py, tools/inspect_data.py and
tools/train_tokenizer.py around everything they do, so a tool fails the way training does.
Under torchrun only rank 0 prints (every rank found the same problem before any collective).
"""
from __future__ import annotations

import contextlib
import os
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from floe.errors import ConfigError

EXIT_CODE = 2  # as for a command-line error (argparse's code)


def report(message: str) -> None:
    """Print `floe: <message>` once (rank 0) on stderr."""
    if os.environ.get("RANK", "0") == "0":
        print(f"floe: {message}", file=sys.stderr)


@contextlib.contextmanager
def config_errors():
    """Turn ConfigError and Hydra/OmegaConf config errors raised inside into report() + exit 2."""
    try:
        yield
    except ConfigError as e:
        report(str(e))
        sys.exit(EXIT_CODE)
    except (HydraException, OmegaConfBaseException) as e:
        report(one_line(e))
        sys.exit(EXIT_CODE)


def one_line(e: BaseException) -> str:
    """Hydra's messages span lines (an indented key, a hint about HYDRA_FULL_ERROR): one line here."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
