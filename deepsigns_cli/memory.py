"""What this machine's memory allows a process. A bound on what a process may map makes a
request too large for the machine fail as an allocation error, which a command reports in one
line, instead of drawing the kernel's out-of-memory killer (SIGKILL: exit 137, no line). It
bounds a suspect ONNX model's worker (runtime.py) and training on the CPU (training.py)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["mapped", "machine_memory", "available_memory", "limit_mapping", "restore_mapping"]

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USAGE = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
# (v2, v1): the usage counts the page cache, of which the inactive part is reclaimed on demand
_CGROUP_STATS = (("/sys/fs/cgroup/memory.stat", "inactive_file"),
                 ("/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def mapped(field: str) -> int | None:
    """A size from /proc/self/status (VmSize: address space, VmData: private writable memory)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _number(paths: tuple[str, ...]) -> int | None:
    """The first of the files `paths` that holds a whole number (a cgroup's "max" is none)."""
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def machine_memory() -> int:
    """The machine's memory, or the container's limit when lower (bytes)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    limit = _number(_CGROUP_LIMITS)
    return limit if limit is not None and 0 < limit < total else total


def available_memory() -> int:
    """Memory a process could take now without the out-of-memory killer (bytes): the
    system's available memory and free swap, or what the container's limit leaves, the lower;
    the machine's memory where /proc/meminfo cannot be read."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("MemAvailable", "SwapFree"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    free = fields["MemAvailable"] + fields.get("SwapFree", 0) if "MemAvailable" in fields else machine_memory()
    limit, used = _number(_CGROUP_LIMITS), _number(_CGROUP_USAGE)
    if limit is not None and used is not None and 0 < limit:
        # (less the page cache the container would give back: a container that had read its
        # files counted nearly all of its limit as used, and left training 1 GiB)
        free = min(free, max(limit - max(used - _reclaimable(), 0), 0))
    return free


def _reclaimable() -> int:
    """The cgroup's inactive page cache (bytes; 0 where it cannot be read)."""
    for path, field in _CGROUP_STATS:
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == field and value.strip().isdigit():
                        return int(value)
        except OSError:
            continue
    return 0


def limit_mapping(extra: int, *, cuda: bool = False) -> tuple[int, int] | None:
    """Cap what this process may map from now on at `extra` bytes more than it maps now: the
    address space (RLIMIT_AS), or with CUDA, whose driver reserves a huge address space it
    never touches, the private writable memory (RLIMIT_DATA, which Linux applies to mmap as
    well since 4.7). A lower limit already set (ulimit) stays. Returns what to restore the
    limit to (`restore_mapping`), None where nothing was changed."""
    import resource

    which, now = ((resource.RLIMIT_DATA, mapped("VmData")) if cuda else (resource.RLIMIT_AS, mapped("VmSize")))
    if now is None:
        return None
    try:
        soft, hard = resource.getrlimit(which)
        limit = now + max(int(extra), 0)
        for bound in (soft, hard):
            if bound != resource.RLIM_INFINITY:
                limit = min(limit, bound)
        resource.setrlimit(which, (limit, hard))
    except (ValueError, OSError):
        return None
    return which, soft


def restore_mapping(previous: tuple[int, int] | None) -> None:
    """Put back the limit that `limit_mapping` changed."""
    if previous is None:
        return
    import resource

    which, soft = previous
    try:
        resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))
    except (ValueError, OSError):
        pass
