"""Sentence continuation (paper §4.2): R(Z) = p_LM(Z ⊤ | X)^(1/T), the LM task as it is (lm_task.py)
with the policy's prompt as the reward's context.
"""

from __future__ import annotations

from .lm_task import LMTask


class ContinuationTask(LMTask):
    name = "continuation"
