"""Distributed mode's Redis must be useless to commands: checked once, at start, by every process.

A command whose shell reaches the network (a sandbox with network on, or no sandbox: an unsandboxed shell
reaches loopback too) can open a connection to Redis. Without credentials it could read every owner's
records and output there and queue jobs the workers run. So when any shell reaches the network:
- `redis_url` must carry credentials (an ACL user and its password), which commands never get (the
  server's `OFFLOAD_*` settings and any variable holding the password are kept out of their environment);
- and Redis must refuse a client that gives none (`NOAUTH`): a password in the URL protects nothing on a
  Redis whose default user still lets anyone in.
Otherwise the process refuses to start, saying what to set. (`redis_url` takes only `redis://` and
`rediss://`: a Unix socket would be reachable from a sandbox without network, which shows the whole file
system read-only.)
"""

from __future__ import annotations

import redis
import redis.exceptions

from server.errors import ConfigError
from server.redact import mask_url, url_secrets
from tools.shell import ShellConfig

ACL_RULES = ("~offload:*", "&*", "+@all", "-@dangerous")
"""What Offload's ACL user needs: keys under `redis_namespace` (`offload` by default), and every channel (Docket
pattern-subscribes, which an ACL channel pattern allows only when written exactly as subscribed)."""
ACL_SETUP = (
    f"in redis-cli: `ACL SETUSER offload on >PASSWORD {' '.join(ACL_RULES)}` and "
    "`ACL SETUSER default off` (and the same lines in redis.conf, or ACL SAVE), then "
    'OFFLOAD_REDIS_URL="redis://offload:PASSWORD@HOST:6379/0"'
)
"""What the README's "Scale out" section sets up (its ACL keys follow `redis_namespace`, `offload` by default)."""


def shells_reaching_network(shell: ShellConfig) -> list[str]:
    """Which shells can open a connection to Redis: one line each, for the start-up refusal."""
    boxes = [("the default shell", shell.sandbox)]
    boxes += [(f"owner {name}", owner.sandbox) for name, owner in sorted(shell.owners.items())]
    return [
        f"{what} ({'no sandbox' if not box.on else 'sandbox with network on'})"
        for what, box in boxes
        if not box.on or box.network
    ]


def check_credentials(url: str, shell: ShellConfig) -> bool:
    """Whether Redis must be checked for auth (some shell reaches the network); ConfigError if the URL
    carries no credentials then."""
    reaching = shells_reaching_network(shell)
    if not reaching:
        return False
    if not url_secrets(url):
        raise ConfigError(
            f"redis_url={mask_url(url)} has no password, and commands can reach the network: "
            f"{', '.join(reaching)}. Any command could then read every owner's records and output in Redis and "
            f"queue work for the workers. Give Offload an ACL user of its own: {ACL_SETUP}; or run every shell "
            "in a sandbox without network (shell_sandbox = 'bwrap', shell_network = false)"
        )
    return True


def check_auth_required(url: str) -> None:
    """ConfigError unless Redis refuses a client that gives no credentials, at the same address."""
    pool = redis.ConnectionPool.from_url(url)
    anonymous = {
        k: v for k, v in pool.connection_kwargs.items() if k not in ("username", "password", "credential_provider")
    }
    anonymous.update(socket_connect_timeout=2.0, socket_timeout=2.0)
    bare = redis.ConnectionPool(connection_class=pool.connection_class, **anonymous)
    client = redis.Redis(connection_pool=bare)
    try:
        client.ping()
    except redis.exceptions.AuthenticationError:
        return  # NOAUTH: only a client with credentials gets in
    except redis.exceptions.ResponseError as exc:
        if "NOAUTH" in str(exc):
            return
        raise ConfigError(f"Redis at redis_url={mask_url(url)} answered an anonymous PING oddly: {exc}") from exc
    except (redis.exceptions.RedisError, OSError) as exc:
        raise ConfigError(
            f"Redis at redis_url={mask_url(url)} does not answer ({type(exc).__name__}); start it, or fix redis_url "
            "(--redis-url or OFFLOAD_REDIS_URL)"
        ) from exc
    finally:
        client.close()
        bare.disconnect()
        pool.disconnect()
    raise ConfigError(
        f"Redis at redis_url={mask_url(url)} lets in a client that gives no password (its default user is on "
        "without one), so the password in redis_url protects nothing: any command reaching the network could "
        f"use Redis. Turn the default user off: {ACL_SETUP}"
    )
