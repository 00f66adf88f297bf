"""Errors a user can act on. The CLI turns any AerieError into one line on stderr and exit 2."""


class AerieError(Exception):
    """Base of every error caused by input the user can fix."""


class ModelError(AerieError, ValueError):
    """The target model cannot be found, fetched or loaded."""


class HeadError(AerieError, ValueError):
    """The draft head cannot be loaded or does not fit the target."""


class InputError(AerieError, ValueError):
    """A prompt, parameter or file given by the user is invalid."""
