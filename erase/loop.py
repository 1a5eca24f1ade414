"""The training loop's old home: `erase.loop.unlearn` and its helpers, kept importable.

The loop now lives in `erase.unlearning` (the recipe runner, running a stage, its checkpoints, its
outputs, the terms); this module re-exports the names code outside the package used.
"""

from .unlearning import CONFIG_FILE, DELTA_FILE, LOSS_HISTORY_FILE, make_config, unlearn  # noqa: F401
from .unlearning.data import draw_shards  # noqa: F401
from .unlearning.running import LOG_EVERY, LOSS_WINDOW, check_in_sync, read_logs, resolve_params, select_parameters  # noqa: F401
from .unlearning.runner import tracker_names  # noqa: F401
from .unlearning.terms import frozen_teacher as frozen_retain_reference, new_average as new_ema  # noqa: F401
