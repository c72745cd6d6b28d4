"""Exceptions raised for bad user input."""


class LmmInputError(ValueError):
    """Bad input: a formula, data set or configuration lmmjax cannot use.

    The message names the culprit (column, term or config key). The CLI
    prints it on one line and exits with status 2.
    """


class NotBuiltError(NotImplementedError):
    """A method that this version of lmmjax does not provide yet."""
