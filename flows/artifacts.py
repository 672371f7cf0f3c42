"""What every Prefect flow of Herald shares: the artifacts' names, task runs that carry
no tags, and chunk tasks that hand their chunk to the run's worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from herald.delivery import workers

Job = TypeVar("Job")
Result = TypeVar("Result")


def artifact_key(name: str, what: str) -> str:
    """``herald-NAME-WHAT``: artifact keys allow lowercase letters, digits and dashes only,
    and only keyed artifacts appear on the Artifacts page with their history."""
    return f"herald-{name.lower().replace('_', '-')}-{what}"


@contextmanager
def untagged_tasks() -> Iterator[None]:
    """Task runs started inside carry no tags; the flow run keeps its own.

    Prefect asks its server for tag concurrency slots before every task run that has
    tags, whether or not any limit exists (PrefectHQ/prefect#19367): one API call before
    each chunk starts. `herald run` tags its flow run, and Prefect gives a task run the
    tags in force where it is submitted, so every chunk waited on that call: 48 ms at the
    median and up to 2.4 s with the temporary server busy on the run's two cores, 13-25 s
    of idle workers in a 300,000-recipient run (BENCHMARKS.md, orchestration). Runs of a
    deployment already started their task runs without tags.
    """
    from prefect.context import TagsContext

    with TagsContext(current_tags=set()):
        yield


def in_run_workers(run_id: str, chunk: Callable[[Job], Result], job: Job) -> Result:
    """A chunk task's body: ``chunk(job)`` in the worker processes of run (or tick)
    ``run_id`` when this process has them (``task_runner: processes``), its log lines
    filed under this task run; else here (threads, a Dask worker)."""
    pool = workers.serving(run_id)
    return chunk(job) if pool is None else pool.run(chunk, job, _task_marks())


def _task_marks() -> dict[str, str]:
    """What a worker process sets on the log records of the chunk this task run hands
    it, so that Prefect files them under this flow and task run; nothing outside one."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return {}
    return {"flow_run_id": str(context.task_run.flow_run_id),
            "task_run_id": str(context.task_run.id)}
