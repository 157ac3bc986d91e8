"""torchrun, ending the way its workers did: `python launch/torchrun.py <torchrun's arguments>`.

    python launch/torchrun.py --standalone --nproc_per_node=2 launch/train.py parallel.ep_size=2

When a worker exits non-zero, torchrun raises ChildFailedError and prints its traceback and a
failure table after the worker's own message; for a refused launch (a config error: exit code 2,
one line printed by rank 0) or a stop on a signal (128 + the signal, a checkpoint written) that is
noise. This wrapper runs torchrun's own `run` and, when its workers failed, exits with the exit code
of the lowest failed rank that ended on its own, silently: the workers have said what happened. (When
one worker fails, torchrun SIGTERMs the others, which then end with 143: the code of a worker that
failed first, e.g. 2 for a config error rank 1 found before rank 0, is the run's. All ending by SIGTERM,
as on a preemption: 143.) Everything else (a crash of torchrun itself) keeps its traceback.
"""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import get_args_parser, run


def exit_code(failures: dict[int, ProcessFailure]) -> int:
    """The run's exit code from its workers' failures (by global rank): the lowest rank's among those
    that did not end by SIGTERM, else the lowest rank's."""
    codes = [f.exitcode if f.exitcode > 0 else 128 - f.exitcode for _, f in sorted(failures.items())]
    return next((c for c in codes if c != 128 + signal.SIGTERM), codes[0])  # killed by a signal: 128 + it


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        return exit_code(e.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
