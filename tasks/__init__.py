"""ponder tasks: reasoning environments with generators, verifiers and step checkers.

`TASKS` maps each task's name to its (stateless) instance; `get_task(name)` looks one up.
"""

from __future__ import annotations

from tasks.arithmetic import Arithmetic
from tasks.base import Problem, Task
from tasks.countdown import Countdown
from tasks.sudoku import Sudoku

TASKS: dict[str, Task] = {task.name: task for task in (Arithmetic(), Countdown(), Sudoku())}

__all__ = ["TASKS", "Problem", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The task called `name`; raises ValueError naming the known tasks if there is none."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
