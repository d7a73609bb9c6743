"""The one place that reaches into kfp.local's private API: a hook around each task it runs.

Why it must: ``kfp.local`` has no public per-task callback, yet the local run needs one (each
step's output in its own log file, a live status line with the step's wall time and result).
The orchestrators of the pinned kfp (2.17.0: ``dag_orchestrator`` and
``enhanced_dag_orchestrator``) call ``task_executor.execute_single_task(task_name, ...)`` through
the module attribute, retries included, so replacing that attribute for the duration of a run
wraps every task. ``tests/pipelines/test_kfp_task_hook.py`` pins this against the installed kfp
(version, signature, and that both orchestrators look the function up by attribute): an
upgrade that changes it fails there, not in a user's run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: the kfp release this hook was checked against (pyproject pins it)
KFP_VERSION = "2.17.0"

#: ``wrap(task_name, run)``: ``run()`` executes the task and returns kfp's ``(outputs, status)``
TaskWrapper = Callable[[str, Callable[[], Any]], Any]


@contextlib.contextmanager
def around_each_task(wrap: TaskWrapper) -> Iterator[None]:
    """Within the block, every task kfp.local runs goes through ``wrap``."""
    from kfp.local.orchestrator import task_executor

    original = task_executor.execute_single_task

    def run_task(*args, **kwargs):
        name = kwargs.get("task_name") or args[0]
        return wrap(name, lambda: original(*args, **kwargs))

    task_executor.execute_single_task = run_task
    try:
        yield
    finally:
        task_executor.execute_single_task = original
