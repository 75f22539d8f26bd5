"""memcompile's graph passes, one module per pass, registered by name in `registry`.

A pass is a function `(gm, example_inputs, *, options) -> gm`. It decides (writes `node.meta`
tags from `memcompile.meta`) or applies (rewrites the graph from tags). It never times, logs
graphs or writes files: the runner (`memcompile.runner`) does that for every pass alike.
"""

from memcompile.passes.registry import PASSES, default_pipeline, get_pass, pass_names

__all__ = ["PASSES", "default_pipeline", "get_pass", "pass_names"]
