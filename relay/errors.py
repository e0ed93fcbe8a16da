"""One exception tree for the relay.

    RelayError
    ├── ConfigError          a setting is wrong: names the file and the key
    ├── SmtpReplyError       refuse a message or command with an SMTP reply
    │   └── ControlHeaderError   a malformed X-AliDM-* / X-Anypost-* header
    ├── InvalidRequest       a send API request that does not say what it must: by field
    ├── InvalidToken         a tracking token that does not verify
    ├── UpstreamError        the upstream refused or could not be reached
    └── StoreError           the store file cannot be opened: names the file
"""

from __future__ import annotations


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


class InvalidRequest(RelayError):
    """A request of the send API (``/v1/email``) with problems: ``errors`` maps each field's
    path (``to[2]``, ``attachments[0].content``) to what is wrong with it."""

    def __init__(self, message: str, errors: dict[str, list[str]]) -> None:
        self.message, self.errors = message, errors
        super().__init__(message)


class InvalidToken(RelayError):
    """A tracking token that is malformed, tampered with or signed by an unknown key."""


class UpstreamError(RelayError):
    def __init__(self, code: int, text: str) -> None:
        self.code, self.text = code, text
        super().__init__(f"{code} {text}")


class StoreError(RelayError):
    def __init__(self, path: object, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"store {path}: {problem}")
