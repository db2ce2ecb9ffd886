"""User-facing errors and the exit codes of the command line.

Every error raised for bad input names the file, key or sample involved and says what to
do. The CLI prints these without a traceback and exits with the code of its class, so a
job script can tell a mistake in the command line from a bad config, bad data, a damaged
checkpoint or a lost peer. Anything else is a bug and keeps its traceback (exit code 1).

=====  =======================================================================
code   meaning
=====  =======================================================================
0      success
1      an unexpected error (a bug: the traceback is printed)
2      usage error: unknown command or option, a missing argument (argparse)
3      configuration error: a YAML file, a ``--set`` override, a value out of range
4      data error: an input catalog, shard, index, manifest or output directory
5      checkpoint error: missing, damaged, or from another configuration
6      distributed job: a peer rank died or stopped answering, or the launcher's tasks do
       not form one MPI world
7      the machine: a GPU, its driver, CUDA libraries or device memory (not the input)
130    interrupted (Ctrl-C; a demo stopped by SIGTERM or SIGUSR1 after its ranks checkpointed)
=====  =======================================================================
"""

EXIT_USAGE = 2


class GalcfError(Exception):
    """Base class for errors caused by user input (files, configs, arguments). Raise one of
    the subclasses: their exit codes are what job scripts test."""

    exit_code = 4


class ConfigError(GalcfError):
    """A configuration file or override is invalid."""

    exit_code = 3


class DataError(GalcfError):
    """An input data file (HDF5 catalog, shard, index, manifest) is unusable."""

    exit_code = 4


class CheckpointError(GalcfError):
    """A checkpoint is missing, corrupt or belongs to another configuration."""

    exit_code = 5


class UsageError(GalcfError):
    """An option's value is wrong (caught after argparse, which exits 2 itself)."""

    exit_code = EXIT_USAGE


class LaunchError(GalcfError):
    """The launcher and the job do not fit (tasks that do not see one MPI world)."""

    exit_code = 6


class PeerLostError(LaunchError):
    """Another rank of a distributed job died or stopped answering."""


class DeviceError(GalcfError):
    """The machine cannot run the job as set up: no usable GPU, a driver or CUDA library that
    does not fit, device memory exhausted, a device id this process cannot see. The input
    data are not at fault; the message says what to check."""

    exit_code = 7


class Interrupted(GalcfError):
    """Stopped by a signal before the work was done, after saving what resuming needs (the
    message says how to continue)."""

    exit_code = 130
