"""Hydra callbacks of launch/train.py (registered in conf/config.yaml under hydra.callbacks).

CompareAtSweepEnd: at the end of a `-m` sweep, the table of tools/compare.py over the sweep's runs
is printed (compact: the differing config keys and the headline metrics) and written with its plots
to <hydra.sweep.dir>/compare (compare.md, compare.csv with every column, *.png), followed by the jobs
that failed. Each sweep has its own hydra.sweep.dir (runs/multirun/<its overrides>, launch/train.py
sweep_name), so its own table. A failing job does not stop the sweep: launch/train.py reports it and
runs the next one; the sweep then exits 1.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("floe")


class CompareAtSweepEnd(Callback):
    """Collects each job's run.dir as it ends; compares them when the sweep ends.

    The jobs report to this object, so it sees them under Hydra's default (in-process) launcher;
    with a remote launcher run `python tools/compare.py '<hydra.sweep.dir>/*'` afterwards.
    """

    def __init__(self) -> None:
        self.run_dirs: list[str] = []
        self.failed: list[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """launch/train.py returns {"failed": why} for a job that failed (the sweep goes on)."""
        run_dir = str(config.run.dir)
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(result, dict) and "failed" in result:
            self.failed.append(f"{run_dir} ({result['failed'].splitlines()[0]})")
        elif job_return.status == JobStatus.COMPLETED and os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            self.run_dirs.append(run_dir)
        else:
            self.failed.append(run_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from floe.run.compare import compare_runs, to_markdown

        if not self.run_dirs:
            self._report_failed()
            return
        out = os.path.join(str(config.hydra.sweep.dir), "compare")
        try:
            table = compare_runs(self.run_dirs, out)
        except ValueError as e:  # a broken metrics file must not hide the runs' own results
            print(f"sweep: no comparison table: {e}")
            self._report_failed()
            return
        print(f"\nsweep of {len(self.run_dirs)} run(s); table and plots in {out} (every column: compare.csv)\n"
              f"{to_markdown(table, full=False)}", end="")
        self._report_failed()

    def _report_failed(self) -> None:
        """The failed jobs, last, where a reader of the sweep's end sees them."""
        if self.failed:
            print(f"\nsweep: {len(self.failed)} run(s) failed or logged nothing:\n  " + "\n  ".join(self.failed))
