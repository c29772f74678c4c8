"""The one error tree of the auditor.

AuditorError
├── ConfigError                 bad or missing configuration (exit 78)
├── KatapultError               anything that went wrong talking to Katapult
│   ├── KatapultAPIError        the API answered with a wrapped error body
│   │   ├── NotFoundError       404 disk_not_found / organization_not_found / … (permanent)
│   │   ├── InTrashError        406 object_in_trash (permanent)
│   │   ├── AuthError           403 invalid_api_token / scope_not_granted / … and 400 missing_api_token (permanent)
│   │   ├── InvalidRequestError 400 invalid_argument (permanent)
│   │   ├── RateLimitedError    429 rate_limit_reached (retried)
│   │   └── UnavailableError    500 / 503 / other 5xx (retried)
│   ├── KatapultResponseError   the body is not the documented shape (missing field, wrong type, not JSON)
│   │   ├── ResponseTooLargeError   the body is bigger than katapult.max_response_bytes (permanent)
│   │   └── UnexpectedObjectError   a lookup answered about another object than the one asked for (permanent)
│   └── KatapultTransportError  timeout, connection refused, protocol error (retried)
├── StoreError                  the database could not be reached or refused the work
│   ├── LeaseLostError          our cycle lease expired and was taken: the cycle's commit is refused
│   └── SchemaError             the database is missing or not at the current revision (read-only commands)
├── LeaseHeldError              another process runs a cycle on this database (`holder`, `since`)
├── FolderNotEmptyError         an evidence export into a folder that already holds something (`folder`)
├── SigningError                an evidence bundle could not be signed with the given key (`key`)
├── PlanError                   a remediation plan that cannot be applied: invalid, expired or edited (exit 2)
├── PlanFilterError             `plan --tier/--rule` naming no tier or rule (`option`; exit 2, API 422)
├── UnknownDiskError            a disk the auditor has never stored (`disk_id`; exit 2, API 404)
└── NotifyError                 a notifier could not deliver (carries `permanent`)

Errors carry fields (`code`, `status_code`, `target`, `permanent`) so callers branch on data, never on messages.
Messages never contain a token, a webhook URL or a password.
"""

from __future__ import annotations


class AuditorError(Exception):
    """Root of every error the auditor raises on purpose."""


class ConfigError(AuditorError):
    """Configuration is invalid; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class KatapultError(AuditorError):
    """Talking to Katapult failed."""

    permanent: bool = False
    code: str = "katapult_error"

    def __init__(
        self,
        message: str,
        *,
        target: str | None = None,
        endpoint: str | None = None,
        status_code: int | None = None,
    ) -> None:
        self.target = target
        self.endpoint = endpoint
        self.status_code = status_code
        super().__init__(message)


class KatapultAPIError(KatapultError):
    """Katapult answered with a `{"error": {code, description, detail}}` body (`description` as cut for the
    message, secrets blanked)."""

    permanent = True

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status_code: int,
        detail: dict[str, object] | None = None,
        description: str = "",
        target: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message, target=target, endpoint=endpoint, status_code=status_code)
        self.code = code
        self.description = description
        self.detail = detail or {}


class NotFoundError(KatapultAPIError):
    """404: the disk, organization or VM does not exist (or the route does not)."""


class InTrashError(KatapultAPIError):
    """406 object_in_trash: the object is in the trash; `detail["trash_object"]` says until when."""


class AuthError(KatapultAPIError):
    """The token is missing, invalid, lacks a scope or is used from a network it is not allowed from."""


class InvalidRequestError(KatapultAPIError):
    """400 invalid_argument: the request itself is wrong; retrying will not help."""


class RateLimitedError(KatapultAPIError):
    """429 rate_limit_reached; `detail["total_permitted"]` is the per-minute budget."""

    permanent = False

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class UnavailableError(KatapultAPIError):
    """500 unhandled_exception, 503 service_unavailable or any other 5xx; `retry_after` from the header, if any."""

    permanent = False

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class KatapultResponseError(KatapultError):
    """The response does not have the documented shape; names the endpoint, target and field."""

    code = "malformed_response"
    permanent = True

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        target: str | None = None,
        endpoint: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, target=target, endpoint=endpoint, status_code=status_code)
        self.field = field


class ResponseTooLargeError(KatapultResponseError):
    """The response body is bigger than the configured cap (`max_bytes`); it was not read any further."""

    code = "response_too_large"

    def __init__(self, message: str, *, max_bytes: int, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.max_bytes = max_bytes


class UnexpectedObjectError(KatapultResponseError):
    """A lookup of one object answered about another one (e.g. asked for disk X, got disk Y)."""

    code = "unexpected_object"


class KatapultTransportError(KatapultError):
    """Timeout, refused connection or broken response stream; retried."""

    code = "transport_error"
    permanent = False

    def __init__(self, message: str, *, kind: str = "transport_error", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.code = kind


class StoreError(AuditorError):
    """The database is unreachable or refused the work."""


class NotifyError(AuditorError):
    """A notifier could not deliver; `permanent` says whether retrying can help."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status_code = status_code
        self.retry_after = retry_after


class LeaseLostError(StoreError):
    """This process no longer holds the lease it worked under (it expired and another took it): nothing is written."""


class SchemaError(StoreError):
    """The database does not exist or is not at the code's schema revision (read-only commands never migrate)."""


class SchemaNewerError(SchemaError):
    """The database is at a schema revision this code does not know: a newer auditor wrote it. Waiting cannot fix
    that (only running the newer auditor can), so a daemon stops rather than retrying."""


class LeaseHeldError(AuditorError):
    """Another process holds the cycle lease; `holder` and `since` say who and since when."""

    def __init__(self, message: str, *, holder: str, since: str) -> None:
        super().__init__(message)
        self.holder = holder
        self.since = since


class FolderNotEmptyError(AuditorError):
    """An export was asked into a folder that already holds something; `folder` names it. Nothing was written."""

    def __init__(self, folder: object) -> None:
        super().__init__(f"{folder} is not empty: give a new or empty folder (nothing was written)")
        self.folder = folder


class SigningError(AuditorError):
    """`ssh-keygen -Y sign` could not sign an evidence manifest with `key` (missing, unreadable, needs a passphrase,
    or ssh-keygen is not installed); the message is one line."""

    def __init__(self, key: object, problem: str) -> None:
        super().__init__(f"cannot sign with {key}: {problem}")
        self.key = key


class PlanError(AuditorError):
    """A remediation plan file that cannot be applied (not a plan, expired, or edited: its hash does not match)."""


class PlanFilterError(AuditorError):
    """A plan filter naming nothing the auditor knows: `option` is "tier" or "rule"; the message says what is known."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


class UnknownDiskError(AuditorError):
    """A disk id the auditor has never stored (no audit has read it)."""

    def __init__(self, disk_id: str) -> None:
        self.disk_id = disk_id
        super().__init__(f"disk {disk_id} is not known to the auditor")
