"""Errors that mean "the user's input is wrong": the CLI prints them and exits 2, no traceback."""


class UsageError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class JobFailed(Exception):
    """The job ran and failed; the CLI exits with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def elide(text: object, limit: int = 160) -> str:
    """``text`` for a one-line message: its middle replaced by '...' beyond ``limit`` characters."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"
