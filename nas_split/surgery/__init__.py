"""Channel surgery: coupling groups (Torch-Pruning), function-preserving split / add, optimizer carry, export.

Layered one way (each module imports only those before it): :mod:`.handlers` (one handler per layer type, in a
registry: what a layer is to surgery and how its tensors are edited) < :mod:`.graph` (coupling groups) <
:mod:`.optim` (optimizer-state carry) < :mod:`.sizes` (widths, ``feature_info``) < :mod:`.blocks` (new blocks in
depth: structure and the depth record) < :mod:`.split` (split / add) < :mod:`.growable` (the growability check) <
:mod:`.export` (save / load) < :mod:`.rebuild` (an architecture from widths, freshly initialised).  Surgery edits
only; what to add is decided above it (:mod:`nas_split.growth`, :mod:`nas_split.splitting`, ``baselines``).
"""
from .export import load_grown, save_grown, timm_shape_string
from .graph import ChannelGroup, CouplingGraph, NotGrowableError, Slot
from .growable import growable_layers
from .handlers import LayerHandler, handler_for, register_handler
from .optim import carry_optimizer_state
from .sizes import apply_sizes, layer_sizes, layer_widths, refresh_feature_info
from .split import NewChannels, SplitRecord, SplitReport, SplitScheme, add_channels, fan_in_shape, split

__all__ = ["ChannelGroup", "CouplingGraph", "NotGrowableError", "Slot", "growable_layers", "NewChannels",
           "SplitRecord", "SplitReport", "SplitScheme", "add_channels", "fan_in_shape", "split",
           "carry_optimizer_state", "load_grown", "save_grown", "timm_shape_string", "apply_sizes", "layer_sizes",
           "layer_widths", "refresh_feature_info", "LayerHandler", "handler_for", "register_handler"]
