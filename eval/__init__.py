"""Evaluation of concept erasure: generation, metrics, named protocols and reports.

`PROTOCOLS` maps protocol names to settings dataclasses whose `run(model, out)` generates images,
measures them and writes `metrics.json` with every setting; `erase eval` and `erase report` are
the command-line front ends.
"""

import pkgutil

from .registry import PROTOCOLS, get_protocol

# The submodules are listed too, so that documentation tools (pdoc) walk them.
__all__ = ["PROTOCOLS", "get_protocol", *sorted(m.name for m in pkgutil.iter_modules(__path__))]
