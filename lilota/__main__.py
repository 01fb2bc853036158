"""``python -m lilota``: the ``lilota`` command (see :mod:`lilota.cli`).

Worker processes of a Lilota instance started by ``python -m lilota worker`` run this
module again under another name (as ``multiprocessing`` does with a main module), so the
command runs only under ``__main__``.
"""

if __name__ == "__main__":
    from lilota.cli import main

    raise SystemExit(main())
