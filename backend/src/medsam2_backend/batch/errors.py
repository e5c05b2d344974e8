"""The one error type of the batch path: bad input found before the model loads, as a sentence a user can act on."""


class CaseInputError(ValueError):
    """An image, prompts file, label map or option that cannot be used; the message is one sentence."""


class CohortError(RuntimeError):
    """The cohort itself could not go on (no Ray cluster at the address, a worker process died)."""
