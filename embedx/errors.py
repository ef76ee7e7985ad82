"""Exceptions raised by the embedx library.

Every error carries a message that says what went wrong *and* what to do about it.
The CLI is the only place that turns them into exit codes.
"""

from __future__ import annotations


class EmbedxError(Exception):
    """Base class of all errors embedx raises on purpose."""


class InputError(EmbedxError):
    """An input path, list file or option value is unusable."""


class WeightsError(EmbedxError):
    """Pretrained weights are missing, unreachable or do not fit the model."""


class OutputExistsError(EmbedxError):
    """The output directory holds a run with another configuration."""


class LockedError(EmbedxError):
    """Another process is writing to the same output directory."""


class FeaturesError(EmbedxError):
    """A feature shard directory is missing, empty, or unsuitable for the job."""


class DamagedFileError(FeaturesError):
    """A Parquet file (a feature shard, a list) cannot be read: truncated, overwritten, not Parquet."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path = path
        self.reason = reason


class SearchIndexError(EmbedxError):
    """An index directory is missing, empty, or does not match the query."""


class DependencyError(EmbedxError):
    """An optional dependency is not installed."""
