"""The driver's view of a running grid: counts, a bar over the steps and one status line per finished step."""

import datetime
import sys
import time
from collections import Counter


class Tracker:
    """Counts, a progress bar over the steps to run (on a terminal) and one status line per finished step:
    done/total, what ended, the counts, the time since the start and an ETA. The ETA is the steps left of
    each kind times the mean seconds of that kind's finished steps (of all finished steps for a kind with
    none yet), over `parallel` (the local slots; on Slurm the jobs running now)."""

    def __init__(self, todo, parallel=None, clock=time.monotonic, out=None):
        from tqdm import tqdm

        self.tqdm, self.counts, self.failed, self.skipped = tqdm, Counter(), [], []
        self.total, self.left, self.seconds = len(todo), Counter(step.kind for step in todo), {}
        self.parallel, self.clock, self.out, self.start = parallel, clock, out, clock()
        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.show(0)

    def show(self, running):
        self.bar.set_postfix_str(
            f"done {self.counts['done']}, running {running}, failed {self.counts['failed']}, "
            f"skipped {self.counts['skipped']}"
        )

    def finish(self, step, how, why="", seconds=None, running=0, pending=None):
        """Count step as `how` (done, failed, skipped; seconds: how long a done step ran) and print its line."""
        self.counts[how] += 1
        self.left[step.kind] -= 1
        self.bar.update(1)
        if how == "failed":
            self.failed.append((step, why))
        elif how == "skipped":
            self.skipped.append(step.name)
        if how == "done" and seconds is not None:
            self.seconds.setdefault(step.kind, []).append(seconds)
        self.tqdm.write(self.status(step, how, why, running, pending), file=self.out or sys.stderr)

    def status(self, step, how, why="", running=0, pending=None):
        """e.g. [3/9] done digits_columnfc/prune.iter_prunetxt_0.6_base | 3 done, 0 failed, 0 skipped,
        2 running | elapsed 0:00:41 | ETA 0:01:30"""
        counts = (
            f"{self.counts['done']} done, {self.counts['failed']} failed, {self.counts['skipped']} skipped, "
            f"{running} running" + (f", {pending} pending (squeue)" if pending is not None else "")
        )
        return " | ".join(
            [
                f"[{sum(self.counts.values())}/{self.total}] {how} {step.name}",
                counts,
                f"elapsed {hms(self.clock() - self.start)}",
                f"ETA {self.eta(running)}",
            ]
            + ([why] if why else [])
        )

    def eta(self, running):
        left = {kind: n for kind, n in self.left.items() if n > 0}
        every = [s for seconds in self.seconds.values() for s in seconds]
        if not left:
            return "0:00:00"
        if not every:
            return "?"
        mean = lambda kind: sum(self.seconds.get(kind, every)) / len(self.seconds.get(kind, every))
        parallel = self.parallel or max(1, running)
        return hms(sum(n * mean(kind) for kind, n in left.items()) / parallel)

    def close(self):
        self.bar.close()


def hms(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))
