"""The one error family: every message says what is wrong, which value, and how to fix it."""


class TrainerError(Exception):
    """Base of every error the trainer reports to a user (the glue shows the message as is).

    ``field`` names the setting at fault (``"train.steps"``) when there is one; the API reports it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(TrainerError):
    """A configuration value is invalid."""


class DatasetError(TrainerError):
    """The dataset folder, an image or a caption cannot be used."""


class UnsupportedModelError(TrainerError):
    """The loaded model is of a kind this trainer cannot train (yet)."""


class FormatError(TrainerError):
    """A file cannot be read or written in the expected format."""


class TrainingError(TrainerError):
    """Training could not go on (for example the loss became NaN)."""


class OutOfMemoryError(TrainingError):
    """The GPU ran out of memory; the message lists what would lower the run's memory."""


class AccessError(TrainerError):
    """A path lies outside the folders the host allows the trainer to use (HTTP 403)."""
