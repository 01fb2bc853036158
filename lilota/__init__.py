"""lilota: long-running tasks in background processes, state in your database."""
