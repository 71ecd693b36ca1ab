"""Plain classes that hold a model or a buffer and run in-process or as Ray actors: the LM primitives (model loading, the LoRA policy, teacher-forced log-probs, prefix scoring), sampler engines, decoding baselines, the replay buffer."""

import resource


def max_rss_bytes() -> int:
    """Peak resident memory of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
