"""Synthetic tasks on which the model families differ: induction heads, selective copying, multi-query AR."""

from __future__ import annotations

from typing import Any

from hybridlm.data.tasks.base import IGNORE, Task, TaskBatch
from hybridlm.data.tasks.induction import InductionHeads
from hybridlm.data.tasks.mqar import MQAR
from hybridlm.data.tasks.selective_copy import SelectiveCopy

TASKS: dict[str, type[Task]] = {t.name: t for t in (InductionHeads, SelectiveCopy, MQAR)}


def get_task(name: str, **params: Any) -> Task:
    """The task called ``name`` (one of ``TASKS``) with its parameters (defaults: each paper's setting)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    unknown = sorted(set(params) - set(TASKS[name].params))
    if unknown:
        raise ValueError(f"task {name!r}: unknown parameter(s) {unknown}; expected some of {list(TASKS[name].params)}")
    return TASKS[name](**params)


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a task from ``Task.describe()``."""
    params = dict(data)
    return get_task(params.pop("name", None), **params)


__all__ = ["IGNORE", "MQAR", "TASKS", "InductionHeads", "SelectiveCopy", "Task", "TaskBatch", "get_task",
           "task_from_dict"]
