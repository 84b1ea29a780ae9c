"""Errors the jetson tools raise for things the user can fix (wrong machine, not root, ...)."""


class JetsonError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""
