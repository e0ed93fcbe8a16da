"""One exception tree for the relay.

    RelayError
    ├── ConfigError          a setting is wrong: names the file and the key
    ├── SmtpReplyError       refuse a message or command with an SMTP reply
    │   └── ControlHeaderError   a malformed X-AliDM-* / X-Anypost-* header
    ├── InvalidInput         bad input from an operator or an API client: the API answers 400
    │   │                    with it as JSON, the CLI prints it (relay/admin/api.py, cli.py)
    │   ├── InvalidRequest       a send request (/v1/email) with problems, by field
    │   ├── InvalidParameter     names the query parameter at fault (``error.parameter``)
    │   └── Conflict             the input collides with what exists: the API answers 409
    ├── ApiError             any other API answer that is not a success (401, 404)
    ├── DecodeError          a MIME part's body cannot be turned into text faithfully
    ├── RefusedAddress       a webhook host resolves to an address it may not reach (an
    │                        OSError, so the HTTP client reports it as a connection failure)
    ├── InvalidToken         a tracking token that does not verify
    └── StoreError           the store cannot be opened or is newer than this relay: names it
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}")


class SmtpReplyError(RelayError):
    """Carries the SMTP reply the client should see."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        self.code, self.enhanced, self.text = code, enhanced, text
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class ControlHeaderError(SmtpReplyError):
    def __init__(self, header: str, problem: str) -> None:
        super().__init__(550, "5.6.0", f"Malformed {header} header: {problem}")
        self.header = header


class InvalidInput(RelayError):
    """A name, a value or a request that validation refused; the message says what is wrong
    in words fit for the person who gave it. ``key``, when given, names the field at fault
    (``exclude_hosts[2]``), so the config file's reader can name it beside the file."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem, self.key = problem, key


class InvalidRequest(InvalidInput):
    """A request of the send API (``/v1/email``) with problems: ``errors`` maps each field's
    path (``to[2]``, ``attachments[0].content``) to what is wrong with it (the /v1/ API answers
    it in Anypost's shape, relay/admin/anypost.py)."""

    def __init__(self, message: str, errors: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.message, self.errors = message, errors


class InvalidParameter(InvalidInput):
    """Bad input, naming the parameter at fault."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class Conflict(InvalidInput):
    """Valid input that collides with what is stored (a name taken, an item only the config
    file may change)."""


class ApiError(RelayError):
    """An API answer with this status and ``{"error": {"status", "message", **details}}``."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


class DecodeError(RelayError):
    """A part's body cannot be turned into text faithfully."""


class RefusedAddress(RelayError, OSError):
    pass


class InvalidToken(RelayError):
    """A tracking token that is malformed, tampered with or signed by an unknown key."""


class StoreError(RelayError):
    def __init__(self, path: object, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"store {path}: {problem}")
