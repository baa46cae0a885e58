"""npmobile's exception types. Every expected failure is one of these, with a one-line message that
names the file, the layer and, where there is one, the fix."""


class NpmobileError(Exception):
    """Base class: the CLI prints these as one line and exits 1."""


class ModelFileError(NpmobileError):
    """A model or weights file cannot be read: corrupt, truncated, wrong kind, inconsistent."""


class WeightsOnlyFileError(ModelFileError):
    """A file with weights and no architecture, opened as a whole model: it needs an architecture to load into."""


class UnsupportedLayerError(NpmobileError):
    """A layer class npmobile does not run (or refuses to run, like Lambda)."""


class WeightsError(NpmobileError):
    """Weights are missing, of the wrong shape, or cannot be found / downloaded."""


class ImageError(NpmobileError):
    """An image file cannot be decoded."""


class InputShapeError(NpmobileError, ValueError):
    """The array given to predict does not have the shape the model takes."""


class UsageError(NpmobileError):
    """An argument the caller gave cannot be used as given (the CLI exits 2, as for its own usage errors)."""


class ThreadCountError(UsageError, ValueError):
    """A thread count the kernels cannot run: below 1, or more than the CPUs this process may use."""


class CustomObjectError(NpmobileError, ValueError):
    """``custom_objects`` maps a name to something npmobile cannot run: a Python function, an unknown name."""


def unreadable(error_type: type[NpmobileError], path, error: OSError, what: str) -> NpmobileError:
    """The one line for a file the operating system would not give us: missing, a directory, or its reason."""
    if isinstance(error, FileNotFoundError):
        return error_type(f"{path}: no such file")
    if isinstance(error, IsADirectoryError):
        return error_type(f"{path}: is a directory, not {what}")
    return error_type(f"{path}: cannot be read ({error.strerror or error})")
