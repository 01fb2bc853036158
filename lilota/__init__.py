"""lilota: long-running Python tasks in background processes, state in your database.

The public API is re-exported here; everything not in ``__all__`` is private.
"""

from lilota.context import TaskContext
from lilota.core import Lilota
from lilota.errors import (
    ConfigurationError,
    DatabaseCorrupt,
    DatabaseError,
    DatabaseFileError,
    DatabaseReadOnly,
    DatabaseReplaced,
    DatabaseSchemaMismatch,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidArgumentType,
    InvalidInput,
    LilotaError,
    LilotaStopped,
    NoRetry,
    RegistrationError,
    SchemaVersionError,
    SerializationError,
    TaskAlreadyFinished,
    TaskAlreadyRegistered,
    TaskCancelled,
    TaskFailed,
    TaskNotFinished,
    TaskNotFound,
    TaskNotRegistered,
    TaskNotRetryable,
    TaskTimeout,
    WorkerAlreadyStarted,
    WorkerLost,
    WorkerStartupError,
)
from lilota.handles import TaskHandle, TaskRef
from lilota.hooks import TaskInfo, TaskOutcome
from lilota.models import ModelProtocol, Task, TaskError, TaskProgress, TaskStatus
from lilota.schedules import crontab, every
from lilota.worker import LilotaWorker

__version__ = "2.0.0.dev0"

__all__ = [
    "ConfigurationError",
    "DatabaseCorrupt",
    "DatabaseError",
    "DatabaseFileError",
    "DatabaseReadOnly",
    "DatabaseReplaced",
    "DatabaseSchemaMismatch",
    "DatabaseUnavailable",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidInput",
    "Lilota",
    "LilotaError",
    "LilotaStopped",
    "LilotaWorker",
    "ModelProtocol",
    "NoRetry",
    "RegistrationError",
    "SchemaVersionError",
    "SerializationError",
    "Task",
    "TaskAlreadyFinished",
    "TaskAlreadyRegistered",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskNotFinished",
    "TaskNotFound",
    "TaskNotRegistered",
    "TaskNotRetryable",
    "TaskOutcome",
    "TaskProgress",
    "TaskRef",
    "TaskStatus",
    "TaskTimeout",
    "WorkerAlreadyStarted",
    "WorkerLost",
    "WorkerStartupError",
    "__version__",
    "crontab",
    "every",
]
