"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
