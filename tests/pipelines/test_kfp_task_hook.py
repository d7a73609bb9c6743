"""The kfp.local task hook against the installed (pinned) kfp: an upgrade that moves the
private function it wraps fails here, not in a user's run."""
from __future__ import annotations

import inspect
from importlib.metadata import version

from transact.pipelines.kfp_task_hook import KFP_VERSION, around_each_task


def test_the_pinned_kfp_is_the_one_installed():
    assert version("kfp") == KFP_VERSION


def test_kfp_local_calls_the_wrapped_function_by_attribute():
    from kfp.local.orchestrator import dag_orchestrator, enhanced_dag_orchestrator, task_executor

    params = list(inspect.signature(task_executor.execute_single_task).parameters)
    assert params[0] == "task_name", params
    for module in (dag_orchestrator, enhanced_dag_orchestrator):
        assert "task_executor.execute_single_task(" in inspect.getsource(module), module.__name__


def test_around_each_task_wraps_and_restores():
    from kfp.local.orchestrator import task_executor

    original, seen = task_executor.execute_single_task, []
    with around_each_task(lambda name, run: seen.append(name) or "ran"):
        assert task_executor.execute_single_task(task_name="train-op") == "ran"
        assert task_executor.execute_single_task("evaluate-op") == "ran"
    assert seen == ["train-op", "evaluate-op"]
    assert task_executor.execute_single_task is original
