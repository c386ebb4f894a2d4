"""Errors that mean "the input is wrong, and here is what to do": the CLI prints them as one line."""


class UserInputError(Exception):
    """Bad input from the user; the message says what to do about it."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named (or a default path) does not exist."""


class InvalidInputError(UserInputError, ValueError):
    """A file exists but is not what it should be."""
