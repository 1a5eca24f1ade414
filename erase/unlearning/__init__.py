"""Unlearning: recipes of stages, each a method with its terms, run into one output folder.

- `recipe`: what a recipe is (plain JSON data, `recipes/`), read and checked field by field;
- `terms`: the retain, robustness and weight-average terms a stage adds to its method;
- `data`: building a run's forget/retain sets, and drawing each step's batch;
- `running`: one stage set up on the model and its step loop; `state`: its checkpoints and resume;
- `outputs`: what a finished run leaves; `runner`: `unlearn`, which runs the stages.
"""

from ..outputs import UNLEARN_CONFIG as CONFIG_FILE, UNLEARN_DELTA as DELTA_FILE
from .outputs import LOSS_HISTORY_FILE
from .recipe import Recipe, load_recipe, shipped_recipes
from .runner import make_config, unlearn
from .terms import AverageTerm, RetainTerm, RobustTerm, Terms

__all__ = ["unlearn", "Recipe", "load_recipe", "shipped_recipes", "Terms", "RetainTerm", "RobustTerm", "AverageTerm",
           "make_config", "CONFIG_FILE", "DELTA_FILE", "LOSS_HISTORY_FILE"]
