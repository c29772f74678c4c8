"""Logging set-up: JSON lines when not on a terminal, plain text on one; secrets scrubbed from every record."""

from __future__ import annotations

import base64
import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, quote, unquote, unquote_plus, urlsplit

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}
MASK = "***"
# A user name or query value shorter than this is not scrubbed on its own: masking "v2" or "id" everywhere would
# shred ordinary text without protecting anything. Passwords and the forms built from them are never skipped.
MIN_FRAGMENT = 3
# Slack, Teams and friends carry the secret as path segments, and a 404 page may echo just one; shorter segments
# ("hooks", "v2") are route names.
MIN_PATH_SEGMENT = 8


def _encodings(raw: str) -> list[str]:
    # As configured (maybe percent-encoded), decoded, and re-encoded the way another client would encode it.
    decoded = unquote(raw)
    return [raw, decoded, quote(decoded, safe="")]


def _url_forms(url: str, split: SplitResult) -> list[str]:
    forms = [url.rstrip("/")]
    userinfo, at, _ = split.netloc.rpartition("@")
    if at:
        raw_user, _, raw_password = userinfo.partition(":")
        user, password = unquote(raw_user), unquote(raw_password)
        if raw_password:
            forms += [userinfo, f"{user}:{password}", *_encodings(raw_password)]
        if len(user) >= MIN_FRAGMENT:  # a URL with only a user name (https://TOKEN@host) carries its secret there
            forms += [userinfo, *_encodings(raw_user)]
        # httpx sends the decoded userinfo as `Authorization: Basic base64(user:password)` (UTF-8), and a
        # receiver echoing request headers quotes it back; the undecoded pair covers clients that do not decode.
        for pair in (f"{user}:{password}", f"{raw_user}:{raw_password}"):
            token = base64.b64encode(pair.encode("utf-8")).decode("ascii")
            forms += [f"Basic {token}", token]
    path = split.path
    if path.strip("/"):
        forms += [path, path.rstrip("/"), unquote(path)]
        for segment in path.split("/"):
            if len(unquote(segment)) >= MIN_PATH_SEGMENT:
                forms += [segment, unquote(segment)]
    if split.query:
        forms.append(split.query)
        for pair in split.query.split("&"):
            value = pair.partition("=")[2]
            if len(unquote_plus(value)) >= MIN_FRAGMENT:
                forms += [value, unquote_plus(value), quote(unquote_plus(value), safe="")]
    if len(split.fragment) >= MIN_FRAGMENT:
        forms.append(split.fragment)
    return forms


def secret_forms(secret: str) -> list[str]:
    """Returns every form in which `secret` can show up in text: itself and, for a URL, its userinfo (plain,
    percent-encoded, user:password, the Basic auth header), path and query values; JSON-escaped too."""
    if not secret:
        return []
    forms = [secret]
    try:
        split: SplitResult | None = urlsplit(secret)
    except ValueError:  # an unbalanced "[" in the host: not a URL we could have sent anything to
        split = None
    if split is not None and split.scheme and split.netloc:
        forms += _url_forms(secret, split)
    escaped = []
    for form in forms:
        # A receiver that echoes a request back as JSON escapes quotes and backslashes, maybe non-ASCII, and some
        # encoders (PHP's json_encode) escape "/" as well.
        for text in (json.dumps(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1]):
            escaped += [text, text.replace("/", "\\/")]
    return list(dict.fromkeys(form for form in forms + escaped if form))


def redact(text: str, secrets: Iterable[str], *, mask: str = MASK) -> str:
    """Returns `text` with every occurrence of every secret replaced by `mask`, overlapping ones as one."""
    spans: list[tuple[int, int]] = []
    for secret in set(secrets):
        if not secret:
            continue
        start = text.find(secret)
        while start >= 0:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    if not spans:
        return text
    # Masking the union of all matches (not one secret after the other) leaves no tail of a secret that overlaps
    # another behind, and never matches a secret inside a mask put there earlier.
    spans.sort()
    out: list[str] = []
    position = 0
    begin, end = spans[0]
    for span_begin, span_end in spans[1:]:
        if span_begin <= end:
            end = max(end, span_end)
            continue
        out += [text[position:begin], mask]
        position, (begin, end) = end, (span_begin, span_end)
    out += [text[position:begin], mask, text[end:]]
    return "".join(out)


def token_forms(token: str) -> list[str]:
    """Returns every form in which a bearer token can come back in a server's answer: those of `secret_forms`,
    and the token base64-encoded (standard and URL-safe alphabets, padded or not), as a server quoting a decoded
    credential, or an encoded copy of it, shows it."""
    forms = secret_forms(token)
    if token:
        raw = token.encode("utf-8")
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(raw).decode("ascii")
            forms += [text, text.rstrip("=")]
            # Inside a longer encoded text (`base64("Bearer " + token)`, a whole header or body encoded), the token
            # starts at any of three byte offsets: the characters that depend on its bytes alone, at each offset.
            for offset, skip in ((1, 2), (2, 3)):
                core = encode(b"\0" * offset + raw).decode("ascii").rstrip("=")[skip:]
                if (offset + len(raw)) % 3:
                    core = core[:-1]  # its last character also holds bits of what follows
                if len(core) >= 8:
                    forms.append(core)
            if len(raw) % 3 and len(text.rstrip("=")) > 8:
                forms.append(text.rstrip("=")[:-1])
    return list(dict.fromkeys(forms))


class Redactor:
    """Blanks every form of some secrets (`token_forms`) in text and in JSON values, with `mask`; never shows
    the secrets itself (its repr is masked)."""

    __slots__ = ("_forms", "_mask")

    def __init__(self, tokens: Iterable[str], *, mask: str = MASK) -> None:
        forms = {form for token in tokens for form in token_forms(token)}
        self._forms = tuple(sorted(forms, key=len, reverse=True))
        self._mask = mask

    def __repr__(self) -> str:
        return "Redactor(***)"

    def __or__(self, other: Redactor) -> Redactor:
        """Returns a redactor of both sets of secrets (this one's mask): one pass, so overlapping secrets of the
        two are masked as one."""
        both = Redactor((), mask=self._mask)
        both._forms = tuple(sorted(set(self._forms) | set(other._forms), key=len, reverse=True))
        return both

    def text(self, text: str) -> str:
        """Returns `text` with every form of every secret masked."""
        return redact(text, self._forms, mask=self._mask) if self._forms else text

    def json(self, value: Any) -> Any:
        """Returns a copy of a JSON value (dicts, lists, strings, numbers) with every string, keys included,
        masked as `text` masks it; anything else is returned as it is."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.json(k): self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.json(v) for v in value]
        return value


class SecretScrubber(logging.Filter):
    """Replaces every form of every configured secret (see `secret_forms`) in a record with ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        forms = {form for secret in secrets for form in secret_forms(secret)}
        self.secrets = sorted(forms, key=len, reverse=True)

    def add(self, secrets: Iterable[str]) -> None:
        """Masks these secrets too, from the next record on (a reloaded configuration may bring new ones)."""
        forms = set(self.secrets) | {form for secret in secrets for form in secret_forms(secret)}
        self.secrets = sorted(forms, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """Returns text with every secret masked."""
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.scrub(message)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        # The JSON formatter writes `extra` fields out as they are.
        extras = {key: value for key, value in vars(record).items() if key not in _STANDARD and isinstance(value, str)}
        for key, value in extras.items():
            setattr(record, key, self.scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        elif record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(*, level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> SecretScrubber:
    """Configures the root logger once for the process; returns the scrubber so more secrets can be added."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    scrubber = SecretScrubber(secrets)
    handler.addFilter(scrubber)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party request logs would print full URLs (webhook URLs are secrets): keep them quiet.
    for noisy in ("httpx", "httpcore", "uvicorn.access", "apscheduler.executors.default", "aiosqlite", "asyncio",
                  "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return scrubber


def update_logging(*, level: str, secrets: Iterable[str] = ()) -> None:
    """Sets the root logger's level and adds secrets to the scrubber of every handler `setup_logging` installed
    (a reloaded configuration; the format stays as set up)."""
    root = logging.getLogger()
    wanted = list(secrets)
    for handler in root.handlers:
        for scrubber in handler.filters:
            if isinstance(scrubber, SecretScrubber):
                scrubber.add(wanted)
    root.setLevel(level.upper())
