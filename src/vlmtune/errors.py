"""Exception types for problems the user can fix (bad config, bad data, bad model choice).

The CLI prints these as one clear message without a traceback; anything else is a bug
and keeps its traceback.
"""


class VlmtuneError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(VlmtuneError):
    """Invalid settings: a YAML key, a CLI override or a contradiction between them."""


class DataError(VlmtuneError):
    """An invalid example or data file: the message names the file, the record and the field.

    `reason` is a short category ("missing field", "wrong type", ...) used to count
    skipped examples by kind. `columns_hint`, appended to the message, is the advice to map a column
    in the config's `columns`; a file read without a config (`--data`) replaces it.
    """

    def __init__(self, message: str, reason: str = "invalid example", columns_hint: str = ""):
        super().__init__(message + columns_hint)
        self.reason = reason
        self.detail = message
        self.columns_hint = columns_hint


class ModelError(VlmtuneError):
    """A model, processor or adapter that cannot be resolved, loaded or adapted."""


class TemplateError(VlmtuneError):
    """A chat template whose output cannot be split into prompt and reply consistently."""


def without_worker_traceback(error: VlmtuneError) -> VlmtuneError:
    """Return an error raised in a dataloader worker with its own message again.

    torch raises a worker's exception in the training process as the same type, with a message
    that contains the worker's traceback and ends in the original message. Any other error is returned as it is.
    """
    text = str(error)
    marker = f"{type(error).__name__}: "
    if not text.startswith(f"Caught {type(error).__name__} in DataLoader worker") or marker not in text:
        return error
    return type(error)(text.rsplit(marker, 1)[1].strip())
