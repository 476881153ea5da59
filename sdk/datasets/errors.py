"""Errors raised while reading the datasets behind fedge's simulator and benchmarks."""

from __future__ import annotations

import pickle

from device_agent.errors import FedgeError


class DatasetError(FedgeError):
    """A dataset could not be loaded or split; the message says why."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not on this machine; the message says how to get them."""


class DatasetFormatError(DatasetError):
    """A dataset file exists but is not in the expected format (bad magic, header, shape)."""


class UnsafePickleError(DatasetFormatError, pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list (a global or an argument)."""
