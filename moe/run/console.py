"""What rank 0 prints while it trains: a progress bar on a terminal, plain lines in a log file.

On a terminal (stderr is a tty) one tqdm bar shows the step, ETA and the step's loss, grad norm,
tokens/s, step time and peak memory; every log line (a checkpoint saved, an eval result, a warning
through logging) is written above the bar through tqdm.write, so the bar is never broken or drawn
twice. In a log file (stderr is not a tty) there is no bar and no carriage return: one line at
step 1 (the first sign of life of a big job), every log.console_every steps and at the last step,
with the same numbers and the ETA.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    """'1:02:03' / '2:03' (as tqdm writes its ETA)."""
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _AboveTheBar:
    """A stream for logging handlers: each record is written above the bar (tqdm.write)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


class Console:
    """Rank 0's console for one training run; `step(record)` after each optimizer step, `line(text)` for
    anything else, `close()` at the end (restores the logging handlers)."""

    def __init__(self, total_steps: int, start_step: int, every: int,
                 extra: Callable[[dict, bool], str] = lambda record, evaluation: "", tty: bool | None = None):
        self.total_steps, self.start_step, self.every, self.extra = total_steps, start_step, every, extra
        self.t0 = time.perf_counter()
        self.log = logging.getLogger("floe")
        self.bar, self._swapped = None, []
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
            self._route_logging_through_bar()

    def _route_logging_through_bar(self) -> None:
        """Point every console handler of the root logger at the bar (restored by close())."""
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream in (sys.stderr, sys.stdout):
                self._swapped.append((handler, handler.setStream(_AboveTheBar(stream))))

    def eta(self, step: int) -> float:
        """Seconds left at this process's mean step time so far."""
        done = step - self.start_step
        return (time.perf_counter() - self.t0) / done * (self.total_steps - step) if done > 0 else 0.0

    def step(self, record: dict) -> None:
        step = record["step"]
        mem = f"{record['mem_peak_gb']:.1f}G" if isinstance(record.get("mem_peak_gb"), (int, float)) else None
        if self.bar is not None:
            fields = {"loss": f"{record['loss']:.3f}", "gnorm": f"{record['grad_norm']:.2f}",
                      "tok/s": f"{record['tokens_per_s']:.0f}", "step": f"{record.get('step_time_s', 0):.2f}s"}
            self.bar.set_postfix({**fields, **({"mem": mem} if mem else {})}, refresh=False)
            self.bar.update(1)
        elif step == self.start_step + 1 or step % self.every == 0 or step == self.total_steps:
            mfu = f" mfu {100 * record['mfu']:.2f}%" if "mfu" in record else ""
            self.log.info("step %d/%d loss %.4f balance %.3f dropped %.3f lr %.2e grad_norm %.3f %.0f tokens/s%s "
                          "step %.2fs%s eta %s%s", step, self.total_steps, record["loss"], record["balance_loss"],
                          record["dropped_frac"], record["lr"], record["grad_norm"], record["tokens_per_s"], mfu,
                          record.get("step_time_s", 0.0), f" mem {mem}" if mem else "", _duration(self.eta(step)),
                          self.extra(record, False))
        if "eval_loss" in record:
            per_source = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items()
                                   if k.startswith("eval_loss/"))
            self.line(f"eval at step {step}: loss {record['eval_loss']:.4f}"
                      + (f" ({per_source})" if per_source else "") + self.extra(record, True))

    def line(self, text: str) -> None:
        """A log line (above the bar on a terminal)."""
        self.log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []
