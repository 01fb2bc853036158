"""``TaskRunner`` of the earlier TaskRunner API (see :mod:`lilota.legacy`)."""

from lilota.legacy import TaskRunner

__all__ = ["TaskRunner"]
