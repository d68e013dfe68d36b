"""The errors of the training data: a bad row (skipped and counted) and a bad data folder or config (fatal)."""


class SampleError(ValueError):
    """One row of a dataset cannot be turned into a sample (unreadable image, bad JSON, no loss...)."""


class DataConfigError(ValueError):
    """The data folder or the dataset config is missing something or is malformed."""
