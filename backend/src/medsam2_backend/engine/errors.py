"""Errors the engine raises for bad input: a `ValueError` whose message is a sentence a user can act on."""


class EngineInputError(ValueError):
    """A request the engine cannot honour (bad volume, prompt, option or checkpoint)."""
