"""Masks the server's own secrets in everything returned to a client.

A command can print `$GITHUB_TOKEN` from a file, an HTTP endpoint can echo a header back: the
environment scrubbing keeps secrets out of commands, this keeps the ones that get in anyway
out of replies. Masks keep the length of what they hide, so output offsets stay true and a
secret split across two reads is still masked in each (reads look past their edges).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from server.output import Chunk, Output

MIN_SECRET_CHARS = 8
"""Shorter values are not treated as secrets: masking every "1" or "true" would wreck outputs."""
SECRET_NAME_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "PRIVATE_KEY", "CREDENTIAL")

M = TypeVar("M", bound=BaseModel)


def known_secrets(environ: Mapping[str, str], named: Iterable[str]) -> list[str]:
    """Values of the variables the server reads credentials from, and of any that look secret."""
    names = set(named) | {n for n in environ if any(m in n.upper() for m in SECRET_NAME_MARKERS)}
    return [environ[n] for n in names if n in environ]


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found = {s.strip() for s in secrets}
        self._secrets = sorted((s.encode() for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)
        self._texts = [s.decode() for s in self._secrets]
        self.margin = max((len(s) for s in self._secrets), default=1) - 1

    @classmethod
    def from_environ(cls, named: Iterable[str], extra: Iterable[str] = ()) -> Redactor:
        return cls([*known_secrets(os.environ, named), *extra])

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def data(self, data: bytes) -> bytes:
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, _mask(len(secret)))
        return data

    def text(self, text: str) -> str:
        for secret in self._texts:
            if secret in text:
                text = text.replace(secret, _mask(len(secret.encode())).decode())
        return text

    def chunk(self, output: Output, chunk: Chunk, *, live: bool) -> Chunk:
        """`chunk` masked, looking `margin` bytes past each edge for a secret the edge cuts.

        Whole secrets are masked wherever they are. At the live end of a running task's output the last
        `margin` bytes are held back whatever they hold (the next read returns them, masked if a secret
        arrived), so no prefix of a secret is returned before the rest is known. What is returned never
        depends on whether it *begins* a secret: masking or holding back partial matches would let a
        command print guesses and learn, character by character, which ones start a secret. So a secret
        cut by the dropped range, or left unfinished at the end of a finished task's output, is not
        masked in part.
        """
        if not self._secrets or not chunk.data:
            return chunk
        start, end = chunk.offset, chunk.offset + len(chunk.data)
        before = _exactly(output, max(start - self.margin, 0), start)
        after = _exactly(output, end, min(end + self.margin, chunk.total_bytes))
        data = self.data(before + chunk.data + after)[len(before) : len(before) + len(chunk.data)]
        if live and end == chunk.total_bytes:
            keep = max(len(data) - self.margin, 0)
            while 0 < keep < len(data) and data[keep] & 0xC0 == 0x80:  # on a character's start
                keep -= 1
            return dataclasses.replace(chunk, data=data[:keep], next_offset=start + keep)
        return dataclasses.replace(chunk, data=data)

    def model(self, model: M) -> M:
        """The same reply with every string masked; untouched (and not copied) when nothing matches."""
        if not self._secrets:
            return model
        dumped = model.model_dump(mode="json", by_alias=True)
        changed, masked = _walk(dumped, self.text)
        return type(model).model_validate(masked) if changed else model


class RedactingFilter(logging.Filter):
    """Masks the secrets in every log line, traceback included: a library's exception text may quote
    a header or a URL holding one. Besides the server's own secrets (the redactor), what a caller sends
    is masked by its shape (`mask_log_text`): the SDK logs request bodies at DEBUG (a header given to
    `http.request`), httpx logs every URL at INFO. On the handler, so every library's logger is covered."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_log_text(self._redactor.text(record.getMessage())), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_log_text(self._redactor.text(record.exc_text))
        return True


LOG_MASK = "***"
_SECRET_NAME = re.compile(r"authorization|cookie|token|secret|key|passw(?:or)?d|credential|signature", re.IGNORECASE)
"""Names whose values are secrets wherever a log line shows a header, a setting or a field (`x-api-key`,
`Proxy-Authorization`, `GITHUB_TOKEN`, `set-cookie`)."""
_RUN = r"(?<![\w.-])(?P<name>[\w.-]++)"
"""A whole name, possessive and anchored at its start: the shapes below stay linear on any line (a
backtracking name pattern took minutes on 64 KiB of `a.a.a.`)."""
_QUOTED_PAIR = re.compile(
    r"(?P<q>\\?[\"'])(?P<name>[\w.-]++)(?P=q)\s*+[:,=]\s*+b?(?P<v>\\?[\"'])(?P<value>(?:(?!(?P=v)).)*+)(?P=v)"
)
"""`"authorization": "Bearer …"`, `'Cookie': '…'`, `(b'x-api-key', b'…')`, JSON escaped inside a string."""
_HEADER_LINE = re.compile(_RUN + r":[ \t]*+(?P<value>[^\r\n]++)")
"""`Authorization: Bearer …` as an HTTP header is written (not `KeyError: …` in a traceback)."""
_ASSIGNMENT = re.compile(_RUN + r"=(?P<value>[^\s&;,'\"]++)")
_SCHEME_TOKEN = re.compile(r"(?<![\w.-])(?:bearer|basic|token)\s++(?P<value>[\w.~+/=-]{8,}+)", re.IGNORECASE)
"""A credential after its scheme word (one with a digit, so prose like "a bearer token for" stays)."""
_URL = re.compile(r"(?<![\w+.-])[a-z][a-z0-9+.-]*+://[^\s\"'<>\\]++", re.IGNORECASE)
_NOT_SECRET_SUFFIXES = ("error", "exception", "warning")


def mask_log_text(text: str) -> str:
    """`text` with what looks secret masked: URLs' user info and every query value (`?q=***&sig=***`),
    and the values of secret-named headers, fields and settings however quoted, `Bearer …` tokens too."""
    text = _URL.sub(lambda found: _mask_url_parts(found.group()), text)
    for shape in (_QUOTED_PAIR, _HEADER_LINE, _ASSIGNMENT, _SCHEME_TOKEN):
        text = shape.sub(_masked_value, text)
    return text


def _masked_value(found: re.Match[str]) -> str:
    """The match with its value masked, when its name is a secret's (any name for a scheme's token)."""
    name = found.groupdict().get("name")
    value = found.group("value")
    if name is not None and (_SECRET_NAME.search(name) is None or name.lower().endswith(_NOT_SECRET_SUFFIXES)):
        return found.group()
    if name is None and not any(char.isdigit() for char in value):
        return found.group()
    start, end = found.span("value")
    whole = found.group()
    return whole[: start - found.start()] + LOG_MASK + whole[end - found.start() :]


def _mask_url_parts(url: str) -> str:
    scheme, _, rest = url.partition("://")
    address, mark, query = rest.partition("?")
    host, slash, path = address.partition("/")
    if "@" in host:
        host = LOG_MASK + "@" + host.rpartition("@")[2]
    if mark:
        query, hash_mark, fragment = query.partition("#")
        query = "&".join(
            f"{name}={LOG_MASK}" if equals else name
            for name, equals, _ in (pair.partition("=") for pair in query.split("&"))
        )
        query += hash_mark + fragment
    return f"{scheme}://{host}{slash}{path}{mark}{query}"


def _exactly(output: Output, start: int, end: int) -> bytes:
    """Bytes [start, end) of the output, or nothing when a gap or a boundary makes that range differ."""
    if end <= start:
        return b""
    chunk = output.read(start, end - start)
    return chunk.data if chunk.offset == start and len(chunk.data) == end - start else b""


def _walk(value: Any, mask: Callable[[str], str]) -> tuple[bool, Any]:
    if isinstance(value, str):
        masked = mask(value)
        return masked != value, masked
    if isinstance(value, list):
        pairs = [_walk(v, mask) for v in value]
        return any(c for c, _ in pairs), [v for _, v in pairs]
    if isinstance(value, dict):
        items = {k: _walk(v, mask) for k, v in value.items()}
        return any(c for c, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return False, value


def _mask(length: int) -> bytes:
    """`[redacted]` when it fits, padded with `*` to the secret's length."""
    label = b"[redacted]"
    if length < len(label):
        return b"*" * length
    return label[:-1] + b"*" * (length - len(label)) + b"]"


def mask_url(url: str) -> str:
    """A URL fit for a message: its user name and password (everything between `://` and the last `@`,
    as typed: a `#`, `/` or `?` in an unencoded password included) and any secret in its query
    (`?password=`, `ssl_password=`, which redis-py reads too) replaced by `***`."""
    from urllib.parse import parse_qsl, urlencode

    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    _, at, rest = rest.rpartition("@")
    address, mark, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_is_url_secret(name) for name, _ in pairs):
        query = urlencode([(name, "***" if _is_url_secret(name) else value) for name, value in pairs], safe="*")
    return f"{scheme}://{'***@' if at else ''}{address}{mark}{query}"


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries, as typed and decoded (each masked in every reply and log line like the
    other secrets): its password, and its query's secret values."""
    from urllib.parse import parse_qsl, unquote

    _, sep, rest = url.partition("://")
    userinfo, _, address = rest.rpartition("@") if sep else ("", "", "")
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []  # the password (a user name is no secret)
    found += [value for name, value in parse_qsl(address.partition("?")[2]) if _is_url_secret(name)]
    return [secret for raw in found for secret in dict.fromkeys((raw, unquote(raw))) if len(secret) >= 4]


def _is_url_secret(name: str) -> bool:
    return name.lower() in _URL_SECRETS


_URL_SECRETS = {"password", "pass", "token", "ssl_password"}
