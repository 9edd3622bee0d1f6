"""Errors that reach the user as one line and exit code 2 (see INTERFACE.md)."""


class UsageError(Exception):
    """Bad usage or bad input: the message names the file, tensor, shape or value at fault."""


class VerificationFailed(Exception):
    """The compiled model missed a bound the user asked for (exit code 1)."""
