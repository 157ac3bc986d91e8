"""torchrun, ending the way its workers did: `python launch/torchrun.py <torchrun's arguments>`.

    python launch/torchrun.py --standalone --nproc_per_node=2 launch/train.py parallel.ep_size=2

When a worker exits non-zero, torchrun raises ChildFailedError and prints its traceback and a
failure table after the worker's own message; for a refused launch (a config error: exit code 2,
one line printed by rank 0) or a stop on a signal (128 + the signal, a checkpoint written) that is
noise. This wrapper runs torchrun's own `run` and, when its workers failed, exits with the exit code
of the lowest failed rank, silently: the workers have said what happened. Everything else (a crash
of torchrun itself) keeps its traceback.
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        first = min(e.failures.items())[1]  # failures by global rank
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # killed by a signal: 128 + it
    return 0


if __name__ == "__main__":
    sys.exit(main())
