"""Errors the engine raises for bad input: a `ValueError` whose message is a sentence a user can act on."""


class EngineInputError(ValueError):
    """A request the engine cannot honour (bad volume, prompt, option or checkpoint)."""


class CheckpointNetworkError(EngineInputError):
    """A known checkpoint is not cached and the Hub cannot be reached (offline mode, no network, a cut download).

    The one failure `make demo` answers with random weights; every other entry point reports it.
    """


class CheckpointIntegrityError(EngineInputError):
    """A checkpoint file does not have the SHA-256 it must have: never loaded, never a reason to fall back."""
