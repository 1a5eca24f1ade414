"""Evaluation protocols: named settings objects that generate, measure and write `metrics.json`.

A protocol is a dataclass whose fields are every setting that decides its numbers; all of them,
the model evaluated, the feature extractor and the package versions are written into the results,
so two runs can be compared, or refused as incomparable. `eval.registry.PROTOCOLS` maps names to
protocols (these and the attacks); the `erase eval` command line is generated from their fields.
One protocol per module; what they share is `base.py` (the results file, batch sizes, the classifier
and FID), `image_checks.py` (whether the images are data at all) and `prompt_runs.py` (the
prompt-file protocols' runs).
"""

from .base import INDEX_FILE, METRICS_FILE, Protocol, cpu_prompt_batch
from .cifar10_class import Cifar10Class
from .class_erasure import ClassErasure
from .digits_class import DigitsClass
from .digits_prompts import DigitsPrompts
from .i2p_nudity import I2PNudity
from .t2i_utility import T2IUtility

__all__ = ["INDEX_FILE", "METRICS_FILE", "Cifar10Class", "ClassErasure", "DigitsClass", "DigitsPrompts", "I2PNudity",
           "Protocol", "T2IUtility", "cpu_prompt_batch",
           # the modules, so that documentation tools (pdoc) walk them
           "base", "cifar10_class", "class_erasure", "digits_class", "digits_prompts", "i2p_nudity", "image_checks",
           "prompt_runs", "t2i_utility"]
