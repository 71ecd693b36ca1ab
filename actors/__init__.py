"""Plain classes that run in-process or as Ray actors."""

import resource


def max_rss_bytes() -> int:
    """Peak resident memory of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
