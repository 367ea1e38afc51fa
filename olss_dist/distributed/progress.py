"""Driver-side progress: shards done/total, samples per second and an ETA.

On a terminal a rich progress bar shows the totals live; in every case (also under ``ray job
submit``, whose logs are not a terminal) one line is logged per finished shard with the same
figures. ``quiet`` turns both off, for cron.
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ShardProgress:
    """Counts finished shards and samples; rate and ETA count only shards computed in this run.

    Args:
        total_shards: shards in the run.
        total_samples: samples in the run.
        quiet: log nothing and show no bar.
        stream: where lines and the bar go (default stdout).
    """

    def __init__(self, total_shards: int, total_samples: int, quiet: bool = False, stream: TextIO | None = None):
        self.total_shards = total_shards
        self.total_samples = total_samples
        self.done_shards = 0
        self.done_samples = 0
        self.computed_samples = 0
        self.quiet = quiet
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.start = time.monotonic()
        self._bar: Progress | None = None
        self._task = None
        if not quiet and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("shards", total=total_shards, rate="", eta="?")
            self._bar.start()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def restored(self, num_shards: int, num_samples: int) -> None:
        """Count shards taken from checkpoints (they do not enter the rate)."""
        self.done_shards += num_shards
        self.done_samples += num_samples
        if num_shards:
            self.log(f"resumed {num_shards}/{self.total_shards} shards ({num_samples} samples) from checkpoints")
        self._refresh()

    def shard_done(self, shard_id: int, num_samples: int, seconds: float, worker: str) -> None:
        """Count a computed shard and log its line."""
        self.done_shards += 1
        self.done_samples += num_samples
        self.computed_samples += num_samples
        self.log(
            f"shard {shard_id} done on {worker} in {seconds:.1f}s | {self.done_shards}/{self.total_shards} shards, "
            f"{self.samples_per_second:.2f} samples/s, ETA {self.eta}"
        )
        self._refresh()

    @property
    def samples_per_second(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.computed_samples / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> str:
        remaining = self.total_samples - self.done_samples
        if remaining <= 0:
            return "0s"
        rate = self.samples_per_second
        return format_duration(remaining / rate) if rate > 0 else "?"

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.done_shards, rate=f"{self.samples_per_second:.2f} samples/s", eta=self.eta
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
