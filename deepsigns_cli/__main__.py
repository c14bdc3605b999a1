"""`python -m deepsigns_cli`, as torchrun starts its processes. For -m, Python puts the current
folder first on sys.path: a click.py, numpy.py or torch/ there (a folder of downloaded data or
models) would run in place of the library. It is taken off before anything else is imported
(a factory's module is found on PYTHONPATH, as for the `deepsigns` command)."""

import os
import sys

if not sys.flags.safe_path and sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from deepsigns_cli.cli.main import main  # noqa: E402

main()
