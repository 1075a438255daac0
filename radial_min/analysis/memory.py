"""What this process may still use and what it holds: read from /proc (Linux), for the streamed model's budgets."""

import mmap
import resource
from pathlib import Path


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by an address-space limit if one is set."""
    avail = 1 << 62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(avail, soft) if soft != resource.RLIM_INFINITY else avail


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (VmHWM), 0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def drop_pages(m):
    """A memory-mapped file's pages out of this process's resident set (the page cache keeps them). `m` is a
    np.memmap or a view of one (a GGUF reader's data)."""
    mm = getattr(m, "_mmap", None) or getattr(getattr(m, "base", None), "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)
