"""The one exception family kneeoa raises for problems a user can fix."""


class KneeoaError(Exception):
    """Base class: bad input data, bad config, missing weights. The message says what, where and the fix."""


class ConfigError(KneeoaError, ValueError):
    """A config value or command option is invalid."""


class ManifestError(KneeoaError, ValueError):
    """A manifest or prediction table breaks its contract (names the row and the column)."""


class LeakageError(ManifestError):
    """A patient appears in more than one split."""


class WeightsNotFoundError(KneeoaError, FileNotFoundError):
    """Pretrained weights are needed but not present locally (names the hub id, the layout and the fetch command)."""


class DataError(KneeoaError, ValueError):
    """A source file (image, DICOM, reading table) cannot be used as given."""


class MissingInputError(KneeoaError, FileNotFoundError):
    """A stage's input file is not in the run folder (names the file and the command that makes it)."""


class NotKneeError(DataError):
    """A file or image is not a frontal knee radiograph (its tags or pixels say so); it gets a reason, not a grade."""
