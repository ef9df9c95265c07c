"""Rich progress bars of the slices a coordinator sends to its nodes and they load (`up --model`)."""

import threading

from rich.console import Console


class LoadBars:
    """One rich progress bar per node while slices arrive and load: `receiving NODE` while the node
    fetches parts it lacks, then `loading NODE`, with rate and time left. A round of bars starts with
    the first update and ends when every node of the round is done: the first round is the whole plan
    (so a fast node finishing early does not end it), a later one a node loaded again on its own."""

    PHASES = {"transfer": "receiving", "load": "loading"}

    def __init__(self, coordinator, console: Console):
        self.coordinator, self.console = coordinator, console
        self.progress, self.tasks, self.rounds = None, {}, 0
        self.phases, self.done = {}, set()
        self._lock = threading.Lock()

    def _start_round(self, name: str, update):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        plan = self.coordinator.plan
        names = [s.node for s in plan.stages] if self.rounds == 0 and plan else []
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
        self.tasks, self.phases, self.done = {}, {}, set()
        for node in names if name in names else [name]:
            stage = next((s for s in plan.stages if s.node == node), None) if plan else None
            self.tasks[node] = self.progress.add_task(f"loading {node}",
                                                      total=stage.weight_bytes if stage else update.bytes_total)
        self.rounds += 1
        self.progress.start()

    def __call__(self, name: str, update):
        with self._lock:
            if self.progress is None or name not in self.tasks:
                if self.progress is not None:  # a node outside this round: finish the round's bars first
                    self.progress.stop()
                self._start_round(name, update)
            task, phase = self.tasks[name], update.phase or "load"
            if self.phases.get(name) != phase:  # receiving, then loading: each phase's bar and rate afresh
                self.phases[name] = phase
                self.progress.reset(task, total=update.bytes_total, description=f"{self.PHASES.get(phase, phase)} {name}")
            self.progress.update(task, completed=update.bytes_done, total=update.bytes_total)
            if update.done:
                self.progress.update(task, completed=update.bytes_total)
                self.done.add(name)
            if self.done >= set(self.tasks):
                self.progress.stop()
                self.progress = None
