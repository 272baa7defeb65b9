"""`completion/complete`: a client offering the `task://{task_id}` templates (the Inspector, a resource
picker) completes a task id from the caller's own recent tasks, newest first, matching what was typed.

Another owner's ids are never offered: the list comes from the caller's own tasks only, so a prefix
tells nobody whether someone else's task exists.
"""

from __future__ import annotations

from mcp_types import Completion, CompletionArgument, PromptReference, ResourceTemplateReference

from server.runtime import Runtime

TASK_TEMPLATES = frozenset({"task://{task_id}", "task://{task_id}/output"})
MAX_VALUES = 100
"""The protocol's most values in one completion."""
RECENT_TASKS = 500
"""How far back the ids offered go (the same reach as list_tasks)."""


def complete(
    runtime: Runtime, owner: str, ref: ResourceTemplateReference | PromptReference, argument: CompletionArgument
) -> Completion:
    """Task ids for the task templates' `task_id`; nothing for anything else (Offload has no prompts)."""
    if not isinstance(ref, ResourceTemplateReference) or ref.uri not in TASK_TEMPLATES or argument.name != "task_id":
        return Completion(values=[], total=0, has_more=False)
    recent = runtime.list_tasks(status=None, tool=None, limit=RECENT_TASKS, owner=owner).tasks
    matching = [task.task_id for task in recent if task.task_id.startswith(argument.value)]
    return Completion(
        values=matching[:MAX_VALUES],
        total=len(matching),
        has_more=len(matching) > MAX_VALUES or len(recent) == RECENT_TASKS,
    )
