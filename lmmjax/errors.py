"""Exceptions raised for bad user input, and the warning class of questionable fits."""


class LmmInputError(ValueError):
    """Bad input: a formula, data set or configuration lmmjax cannot use.

    The message names the culprit (column, term or config key). The CLI
    prints it on one line and exits with status 2.
    """


class NotBuiltError(NotImplementedError):
    """A method that this version of lmmjax does not provide yet."""


class LmmWarning(UserWarning):
    """A fit that lmmjax completed but that deserves a look: singular, or not converged.

    Issued at fit time, as lme4 messages then; ``warnings.simplefilter("error",
    LmmWarning)`` turns them into errors.
    """
