"""The local backend: slots on GPUs or CPU cores, the order steps start in, and the pool that runs them."""

import os
import queue
import sys
import threading
from dataclasses import dataclass

from common import Terminated
from gridrun.step import last_line_of, run_step
from gridrun.tracker import Tracker


def failure(step, code):
    what = f"killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exit {code}"
    return f"{what}: {last_line_of(step.output('err')) or '(no stderr)'}"


@dataclass(frozen=True)
class Slot:
    cuda: str | None  # CUDA_VISIBLE_DEVICES of a GPU slot; None: a CPU slot
    threads: int  # OMP_NUM_THREADS

    @property
    def gpu_id(self):
        return "-1" if self.cuda is None else "0"  # the one GPU a step sees is its cuda:0


def local_slots(gpus, jobs, jobs_per_gpu, cores):
    """One slot per step that may run at once, in the order they are handed out: jobs_per_gpu on each GPU of
    gpus, round robin (0, 1, 0, 1: the first steps spread over the GPUs), else `jobs` CPU slots; the cores
    shared evenly (at least one thread each)."""
    devices = [gpu for _ in range(jobs_per_gpu) for gpu in gpus] or [None] * jobs
    return [Slot(device, max(1, cores // len(devices))) for device in devices]


class Schedule:
    """Which step runs when, on which slot: in grid order, a step starts on the first free slot once what
    it needs is done and the step before it in its log has ended; a step whose need failed is skipped."""

    def __init__(self, todo, done, slots):
        self.state = dict.fromkeys(done, "done")
        self.free, self.waiting, self.running = list(slots), list(todo), {}

    def next(self):
        """([(step, slot) to start now], [steps skipped now]), both in grid order."""
        started, skipped = [], []
        for step in list(self.waiting):  # in grid order, so a skip reaches the dependents in the same pass
            if any(self.state.get(need) in ("failed", "skipped") for need in step.needs):
                self.state[step.name] = "skipped"
                self.waiting.remove(step)
                skipped.append(step)
            elif (
                self.free
                and all(self.state.get(need) == "done" for need in step.needs)
                and all(self.state.get(name) in ("done", "failed", "skipped") for name in step.after)
            ):
                self.waiting.remove(step)
                self.running[step.name] = self.free.pop(0)
                started.append((step, self.running[step.name]))
        return started, skipped

    def finish(self, step, ok):
        self.free.append(self.running.pop(step.name))
        self.state[step.name] = "done" if ok else "failed"


def run_local(todo, done, gpus, jobs, retries, jobs_per_gpu=1):
    """jobs_per_gpu steps at a time on each GPU (or `jobs` CPU steps), each as soon as what it needs is done."""
    slots = local_slots(gpus, jobs, jobs_per_gpu, len(os.sched_getaffinity(0)))
    schedule, finished, tracker = Schedule(todo, done, slots), queue.Queue(), Tracker(todo, parallel=len(slots))

    def work(step, slot):
        env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads), CUDA_VISIBLE_DEVICES=slot.cuda or "")
        try:
            code, record = run_step(step, slot.gpu_id, env, retries)
        except Exception as err:  # e.g. a full disk while writing the output: report, don't hang the driver
            code, record = f"grid.py could not run it ({err})", None
        finished.put((step, code, record))

    def launch():
        """Start what can start; the steps skipped now. Then a status line counts the steps just started."""
        started, skipped = schedule.next()
        for step, slot in started:
            threading.Thread(target=work, args=(step, slot), daemon=True).start()
        return skipped

    try:
        skipped = launch()
        while True:
            for step in skipped:
                tracker.finish(step, "skipped", running=len(schedule.running))
            tracker.show(len(schedule.running))
            if not schedule.running:
                break
            step, code, record = finished.get()
            schedule.finish(step, code == 0)
            skipped = launch()
            tracker.finish(
                step,
                "done" if code == 0 else "failed",
                "" if code == 0 else code if isinstance(code, str) else failure(step, code),
                seconds=record and record["seconds"],
                running=len(schedule.running),
            )
    except (KeyboardInterrupt, Terminated) as err:
        tracker.close()
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        print(
            f"error: interrupted ({name}); the {len(schedule.running)} running steps were ended (each keeps only "
            f"finished models); rerun this command to run the rest: finished steps are skipped",
            file=sys.stderr,
        )
        sys.exit(code)  # the steps get SIGTERM as their threads end (die_with_parent)
    tracker.close()
    return tracker
