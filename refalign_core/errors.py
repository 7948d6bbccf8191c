"""The one error type users see for bad input: the message names the input and what is expected."""


class RefAlignInputError(ValueError):
    """Bad user input (file, tensor, option). The message says which input and what was expected."""
