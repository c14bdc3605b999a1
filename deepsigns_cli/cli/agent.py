"""torch.distributed.run, as `--nproc N` starts it (`python -m deepsigns_cli.cli.agent ARGS` is
`python -m torch.distributed.run ARGS`), and, once a run that failed or was stopped is over, the
temporary files that its processes left (`api.sweep_run`).

The command that started the run sweeps them too, but not when it was killed outright itself
(SIGKILL): torchrun's agent was then told to stop (`launch._stop_with_parent`), gave the
processes 30 s to end, and killed one that had not ended by then (as one waiting on the other
inside a collective may not have: its Python code, which cleans up, cannot run there). That
process's temporary files were left beside the outputs until another command wrote there. The
agent's run returns only once every process it started has ended, so nothing it sweeps can be
written to again. It then ends as a command does (`common.end_now`), without Python's teardown
of torch: the run's end came that much sooner.
"""

from __future__ import annotations

import runpy
import sys
import time

from .common import end_now
from .launch import _outputs


def main() -> None:
    from ..api import sweep_run

    began = time.time() - 1  # (a file's time is the kernel's coarse clock: a little behind this one)
    outputs = list(_outputs(sys.argv))
    code = 1
    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        raise  # (Python ends as Ctrl-C ends it: by the signal)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # (what Python prints: torchrun's account of the failure)
    finally:
        if code not in (0, None):
            sweep_run(outputs, began)
    end_now(code)


if __name__ == "__main__":
    main()
