"""gfnlm: GFlowNet fine-tuning of language models for amortized posterior inference.

The project's layers are subpackages of this one name (DESIGN §4): gfnlm.configs <- gfnlm.cluster
<- gfnlm.actors <- gfnlm.rewards <- gfnlm.learner, so that nothing generic (a `configs` or
`rewards` of the user's own project) is shadowed by them or shadows them. In a checkout (or a Ray
job's working_dir) they are the repository's top-level folders beside this one; an installed wheel
holds them inside this folder.

The Python API, what the command line calls (gfnlm.learner.api; imported on first use, so that
`import gfnlm` stays light):

    import gfnlm

    run = gfnlm.train("continuation", ["learner.steps=20"], run_dir="runs/mine")
    gfnlm.sample("runs/mine", "The cat sat", n=4)
"""

import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "learner", "cli.py")):
    __path__.append(_root)  # a checkout: gfnlm.learner is <root>/learner

__version__ = "0.1.0"

API = ("load_config", "check", "train", "resume", "evaluate", "sample", "predict", "open_run", "target", "Run", "TrainedRun")
__all__ = [*API, "ConfigError"]


def __getattr__(name: str):
    if name in API:
        from gfnlm.learner import api

        return getattr(api, name)
    if name == "ConfigError":
        from gfnlm.configs import ConfigError

        return ConfigError
    raise AttributeError(f"module 'gfnlm' has no attribute {name!r}")
