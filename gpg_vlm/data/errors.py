"""The data package's one error type, apart so that images and the schema need not import each other."""


class DataError(ValueError):
    """A dataset row, file or image that cannot be used; the message names source and field."""
