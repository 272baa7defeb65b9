"""github.* tools on the shared githubkit client: issue and pull-request triage, trimmed results.

Requests go through githubkit (auth, ETag revalidation via its HTTP cache, bounded retries of
server errors) but read raw JSON, trimmed to the fields an assistant needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from tools.clients import ClientPool
from tools.context import JSON, ErrorKind, TaskFailure, ToolContext
from tools.http import failure_for_status, failure_for_transport
from tools.registry import Handler, ToolSpec

BODY_MAX_CHARS = 4000
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
Number = Annotated[int, Field(ge=1)]
PerPage = Annotated[int, Field(ge=1, le=100)]
Page = Annotated[int, Field(ge=1, le=1000)]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: Name
    repo: Name


class IssueArgs(_Args):
    number: Number


class PagedIssueArgs(IssueArgs):
    per_page: PerPage = 30
    page: Page = 1


class ListIssuesArgs(_Args):
    state: Literal["open", "closed", "all"] = "open"
    labels: list[str] = []
    per_page: PerPage = 30
    page: Page = 1


class WorkflowRunsArgs(_Args):
    branch: str | None = None
    status: str | None = None
    per_page: PerPage = 20
    page: Page = 1


class AddLabelsArgs(IssueArgs):
    labels: Annotated[list[str], Field(min_length=1, max_length=100)]


class CommentArgs(IssueArgs):
    body: Annotated[str, Field(min_length=1, max_length=65536)]


# ---- trimming ----


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= BODY_MAX_CHARS else value[:BODY_MAX_CHARS] + f"… [{len(value)} chars]"


def _login(user: Any) -> str | None:
    return user.get("login") if isinstance(user, dict) else None


def _issue(data: dict[str, Any]) -> JSON:
    return {
        "number": data.get("number"),
        "title": data.get("title"),
        "state": data.get("state"),
        "author": _login(data.get("user")),
        "labels": [label.get("name") for label in data.get("labels", []) if isinstance(label, dict)],
        "assignees": [_login(a) for a in data.get("assignees", [])],
        "comments": data.get("comments"),
        "is_pull_request": "pull_request" in data,
        "created_at": data.get("created_at"),
        "updated_at": data.get("updated_at"),
        "closed_at": data.get("closed_at"),
        "url": data.get("html_url"),
        "body": _text(data.get("body")),
    }


def _comment(data: dict[str, Any]) -> JSON:
    return {
        "id": data.get("id"),
        "author": _login(data.get("user")),
        "created_at": data.get("created_at"),
        "url": data.get("html_url"),
        "body": _text(data.get("body")),
    }


def _pull(data: dict[str, Any]) -> JSON:
    return {
        **_issue(data),
        "draft": data.get("draft"),
        "merged": data.get("merged"),
        "mergeable": data.get("mergeable"),
        "head": (data.get("head") or {}).get("ref"),
        "base": (data.get("base") or {}).get("ref"),
        "additions": data.get("additions"),
        "deletions": data.get("deletions"),
        "changed_files": data.get("changed_files"),
    }


def _file(data: dict[str, Any]) -> JSON:
    return {key: data.get(key) for key in ("filename", "status", "additions", "deletions", "changes")} | {
        "patch": _text(data.get("patch"))
    }


def _run(data: dict[str, Any]) -> JSON:
    keys = ("id", "name", "status", "conclusion", "event", "head_branch", "head_sha", "created_at", "html_url")
    return {key: data.get(key) for key in keys}


# ---- the edge: githubkit and httpx errors become task failures here ----


async def _call(pool: ClientPool, method: str, path: str, what: str, **kwargs: Any) -> Any:
    from githubkit.exception import GitHubException, RequestFailed, RequestTimeout

    gh = pool.github()
    pool.served("github")
    try:
        response = await gh.arequest(method, path, **kwargs)
    except RequestFailed as exc:
        raise failure_for_status(exc.response.status_code, exc.response.headers, what) from exc
    except RequestTimeout as exc:
        raise TaskFailure(ErrorKind.TIMEOUT, f"{what} timed out") from exc
    except GitHubException as exc:
        cause = exc.__cause__
        if isinstance(cause, httpx.TransportError):
            raise failure_for_transport(cause, what) from exc
        raise TaskFailure(ErrorKind.HTTP_STATUS, f"{what} failed: {type(exc).__name__}: {exc}") from exc
    except httpx.TransportError as exc:
        raise failure_for_transport(exc, what) from exc
    return response.json()


def _paging(args: Any) -> dict[str, Any]:
    return {"per_page": args.per_page, "page": args.page}


Read = Callable[[ClientPool, Any], Awaitable[JSON]]


async def _get_issue(pool: ClientPool, a: IssueArgs) -> JSON:
    return _issue(await _call(pool, "GET", f"/repos/{a.owner}/{a.repo}/issues/{a.number}", f"issue #{a.number}"))


async def _list_issue_comments(pool: ClientPool, a: PagedIssueArgs) -> JSON:
    path = f"/repos/{a.owner}/{a.repo}/issues/{a.number}/comments"
    data = await _call(pool, "GET", path, f"comments of #{a.number}", params=_paging(a))
    return {"comments": [_comment(c) for c in data], "page": a.page, "more": len(data) == a.per_page}


async def _list_issues(pool: ClientPool, a: ListIssuesArgs) -> JSON:
    params = {**_paging(a), "state": a.state}
    if a.labels:
        params["labels"] = ",".join(a.labels)
    data = await _call(pool, "GET", f"/repos/{a.owner}/{a.repo}/issues", f"issues of {a.owner}/{a.repo}", params=params)
    return {"issues": [_issue(i) for i in data], "page": a.page, "more": len(data) == a.per_page}


async def _get_pull_request(pool: ClientPool, a: IssueArgs) -> JSON:
    return _pull(await _call(pool, "GET", f"/repos/{a.owner}/{a.repo}/pulls/{a.number}", f"pull #{a.number}"))


async def _list_pull_request_files(pool: ClientPool, a: PagedIssueArgs) -> JSON:
    path = f"/repos/{a.owner}/{a.repo}/pulls/{a.number}/files"
    data = await _call(pool, "GET", path, f"files of pull #{a.number}", params=_paging(a))
    return {"files": [_file(f) for f in data], "page": a.page, "more": len(data) == a.per_page}


async def _list_workflow_runs(pool: ClientPool, a: WorkflowRunsArgs) -> JSON:
    params: dict[str, Any] = _paging(a)
    params |= {k: v for k, v in (("branch", a.branch), ("status", a.status)) if v}
    data = await _call(pool, "GET", f"/repos/{a.owner}/{a.repo}/actions/runs", "workflow runs", params=params)
    runs = data.get("workflow_runs", [])
    return {"total": data.get("total_count"), "runs": [_run(r) for r in runs], "page": a.page}


async def _add_labels(pool: ClientPool, a: AddLabelsArgs) -> JSON:
    path = f"/repos/{a.owner}/{a.repo}/issues/{a.number}/labels"
    data = await _call(pool, "POST", path, f"labelling #{a.number}", json={"labels": a.labels})
    return {"labels": [label.get("name") for label in data]}


async def _create_issue_comment(pool: ClientPool, a: CommentArgs) -> JSON:
    path = f"/repos/{a.owner}/{a.repo}/issues/{a.number}/comments"
    return _comment(await _call(pool, "POST", path, f"commenting on #{a.number}", json={"body": a.body}))


_TOOLS: list[tuple[str, str, type[BaseModel], Read, bool]] = [
    ("get_issue", "One issue: title, state, labels, author, body (trimmed).", IssueArgs, _get_issue, False),
    (
        "list_issue_comments",
        "Comments of an issue or pull request, a page at a time.",
        PagedIssueArgs,
        _list_issue_comments,
        False,
    ),
    (
        "list_issues",
        "Issues of a repository by state and labels, a page at a time.",
        ListIssuesArgs,
        _list_issues,
        False,
    ),
    ("get_pull_request", "One pull request: branches, mergeability, size, body.", IssueArgs, _get_pull_request, False),
    (
        "list_pull_request_files",
        "Files a pull request changes, with trimmed patches.",
        PagedIssueArgs,
        _list_pull_request_files,
        False,
    ),
    (
        "list_workflow_runs",
        "Recent GitHub Actions runs, by branch and status.",
        WorkflowRunsArgs,
        _list_workflow_runs,
        False,
    ),
    ("add_labels", "Add labels to an issue or pull request.", AddLabelsArgs, _add_labels, True),
    ("create_issue_comment", "Comment on an issue or pull request.", CommentArgs, _create_issue_comment, True),
]
"""name, description, input model, call, writes: every github.* tool."""


def github_specs(pool: ClientPool) -> list[ToolSpec]:
    token_env = pool.config.github_token_env
    has_token = pool.config.secret(token_env) is not None
    read_note = None if has_token else f"unauthenticated (60 requests/hour): set {token_env} for more"
    write_block = None if has_token else f"no GitHub token: set the environment variable {token_env} and restart"
    return [
        ToolSpec(
            name=f"github.{name}",
            description=text,
            input_model=model,
            handler=_bound(call, pool),
            cacheable=not write,
            destructive=write,
            open_world=True,
            max_concurrency=8,
            limit_group="github",
            unavailable=write_block if write else None,
            note=write_block if write else read_note,
        )
        for name, text, model, call, write in _TOOLS
    ]


def _bound(call: Read, pool: ClientPool) -> Handler:
    async def handler(arguments: Any, _ctx: ToolContext) -> JSON:
        return await call(pool, arguments)

    return handler
