"""Errors that mean "the user's input is wrong": the CLI prints them and exits 2, no traceback."""


class UsageError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class JobFailed(Exception):
    """The job ran and failed; the CLI exits with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
