"""Errors that mean "the user's input is wrong": the CLI prints them and exits 2, no traceback."""


class UsageError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""
