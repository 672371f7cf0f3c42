"""What ``herald run`` shows on stderr while a run sends: a progress bar on a terminal,
one line per chunk elsewhere (a log file, CI)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar

from herald.flows.progress import Progress


class LiveReport:
    """A progress watcher (``herald.flows.progress.watching``) drawing on ``console``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Bar | None = None
        self.task: TaskID | None = None

    def begin(self, progress: Progress) -> None:
        self.console.print(f"[bold]{progress.flow}[/] {progress.run_key} · run "
                           f"{progress.run_id} · {progress.recipients:,} recipients in "
                           f"{progress.chunks} chunk{'s' if progress.chunks != 1 else ''}"
                           + (" · dry run" if progress.dry_run else ""))
        if not self.console.is_terminal:
            return
        self.bar = Bar(TextColumn("chunks"), MofNCompleteColumn(), BarColumn(),
                       TextColumn("{task.fields[figures]}"), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(),
                       console=self.console, transient=False)
        self.task = self.bar.add_task("send", total=progress.chunks or 1,
                                      figures=self._figures(progress))
        self.bar.start()

    def chunk(self, progress: Progress, line: str) -> None:
        if self.bar is None or self.task is None:
            self.console.print(line, markup=False)
            return
        self.bar.console.print(line, markup=False)
        self.bar.update(self.task, completed=progress.done, figures=self._figures(progress))

    def end(self, progress: Progress) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=progress.chunks or 1,
                            figures=self._figures(progress))
            self.bar.stop()
            self.bar = None

    def end_quietly(self) -> None:
        """Stop drawing (a run that failed before its end)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    @staticmethod
    def _figures(progress: Progress) -> Any:
        return (f"{progress.processed:,}/{progress.recipients:,} recipients · "
                f"[green]sent {progress.counts['sent']:,}[/] · "
                f"[red]failed {progress.counts['failed']:,}[/]")
