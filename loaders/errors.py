"""One exception type for bad input data, so callers (CLI, server) can turn it into a clear message."""


class DataError(ValueError):
    """Input data is unusable as given; the message says what is wrong and how to fix it."""
