"""nas-split: grow networks by splitting steepest descent.

Public API (stable names): :class:`Grower`, :func:`growable_layers`, :func:`split`, :func:`add_channels`,
:func:`save_grown`, :func:`load_grown`, :class:`SplitScheme`, :class:`NewChannels`, and :data:`VARIANTS` (the
splitting variants a Grower takes as ``method``).  Datasets live in :mod:`nas_split.data`, the training loop in
:mod:`nas_split.training`, cost accounting in :mod:`nas_split.cost`, the growth loop in :mod:`nas_split.engine`,
user errors in :mod:`nas_split.errors`; ``docs/architecture.md`` maps the rest.
"""
from .grower import VARIANTS, Grower, GrowthReport
from .surgery import (
                      NewChannels,
                      NotGrowableError,
                      SplitReport,
                      SplitScheme,
                      add_channels,
                      growable_layers,
                      load_grown,
                      save_grown,
                      split,
)

__version__ = "0.1.0"

__all__ = ["VARIANTS", "Grower", "GrowthReport", "NewChannels", "NotGrowableError", "SplitReport", "SplitScheme",
           "add_channels", "growable_layers", "load_grown", "save_grown", "split", "__version__"]
