"""`anthropic.message` on the shared AsyncAnthropic client; identical requests are served once."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from tools.clients import ClientPool
from tools.context import JSON, ErrorKind, TaskFailure, ToolContext
from tools.http import failure_for_status
from tools.registry import ToolSpec


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["user", "assistant"]
    content: Annotated[str, Field(min_length=1)]


class _MessageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str | None, Field(description="A single user message (or give messages).")] = None
    messages: Annotated[list[Message] | None, Field(description="The conversation (or give prompt).")] = None
    system: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=64000)] = 1024
    temperature: Annotated[float | None, Field(ge=0, le=1)] = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> _MessageArgs:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


def _args_model(default_model: str) -> type[_MessageArgs]:
    """The model name's default is the configured one, so it is part of the cache key."""
    model_field: Any = (str, Field(default_model, min_length=1, description="Model name."))
    return create_model("MessageArgs", __base__=_MessageArgs, model=model_field)


async def message(args: Any, pool: ClientPool) -> JSON:
    import anthropic

    client = pool.anthropic()
    pool.served("anthropic")
    messages = (
        [{"role": "user", "content": args.prompt}]
        if args.prompt is not None
        else [m.model_dump() for m in args.messages]
    )
    request: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "messages": messages}
    if args.system is not None:
        request["system"] = args.system
    if args.temperature is not None:
        request["temperature"] = args.temperature
    what = f"anthropic.message ({args.model})"
    try:
        reply = await client.messages.create(**request)
    except anthropic.APIStatusError as exc:
        raise failure_for_status(exc.status_code, exc.response.headers, what) from exc
    except anthropic.APITimeoutError as exc:
        raise TaskFailure(ErrorKind.TIMEOUT, f"{what} timed out") from exc
    except anthropic.APIConnectionError as exc:
        raise TaskFailure(ErrorKind.CONNECTION, f"{what} could not connect: {type(exc).__name__}") from exc
    text = "".join(getattr(block, "text", "") for block in reply.content)
    return {
        "text": text,
        "stop_reason": reply.stop_reason,
        "model": reply.model,
        "usage": {"input_tokens": reply.usage.input_tokens, "output_tokens": reply.usage.output_tokens},
    }


def claude_specs(pool: ClientPool) -> list[ToolSpec]:
    key_env = pool.config.anthropic_key_env
    missing = None if pool.config.secret(key_env) else f"no API key: set the environment variable {key_env} and restart"

    async def handler(args: Any, _: ToolContext) -> JSON:
        return await message(args, pool)

    return [
        ToolSpec(
            name="anthropic.message",
            description="Ask a Claude model; an identical request within the TTL is served from the cache.",
            input_model=_args_model(pool.config.anthropic_model),
            handler=handler,
            cacheable=True,
            open_world=True,
            max_concurrency=4,
            limit_group="anthropic",
            unavailable=missing,
            note=missing,
        )
    ]
