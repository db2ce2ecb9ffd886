"""User-facing errors.

Every error raised for bad input names the file, key or sample involved and says what to
do. The CLI prints these without a traceback; anything else is a bug and keeps its
traceback.
"""


class GalcfError(Exception):
    """Base class for errors caused by user input (files, configs, arguments)."""


class ConfigError(GalcfError):
    """A configuration file or override is invalid."""


class DataError(GalcfError):
    """An input data file (HDF5 catalog, shard, index, manifest) is unusable."""


class CheckpointError(GalcfError):
    """A checkpoint is missing, corrupt or belongs to another configuration."""


class PeerLostError(GalcfError):
    """Another rank of a distributed job died or stopped answering."""
