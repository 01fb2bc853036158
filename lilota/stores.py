"""Stores of the earlier TaskRunner API (see :mod:`lilota.legacy`).

``MemoryTaskStore`` served by a ``StoreManager`` keeps tasks in memory;
``DatabaseTaskStore(db_url)`` (also named ``SqlTaskStore``) keeps them in the database that
:class:`lilota.Lilota` uses, so ``TaskRunner(DatabaseTaskStore("sqlite:///lilota.db"))``
moves old code to a real database.
"""

from lilota.legacy import DatabaseTaskStore, MemoryTaskStore, SqlTaskStore, StoreManager, TaskInfo

__all__ = ["DatabaseTaskStore", "MemoryTaskStore", "SqlTaskStore", "StoreManager", "TaskInfo"]
