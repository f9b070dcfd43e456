"""Channel surgery: coupling groups (Torch-Pruning), function-preserving split / add, optimizer carry, export."""
from .export import load_grown, refresh_feature_info, save_grown, timm_shape_string
from .graph import ChannelGroup, CouplingGraph, NotGrowableError, Slot, growable_layers
from .optim import carry_optimizer_state
from .split import NewChannels, SplitRecord, SplitReport, SplitScheme, add_channels, fan_in_shape, split

__all__ = ["ChannelGroup", "CouplingGraph", "NotGrowableError", "Slot", "growable_layers", "NewChannels",
           "SplitRecord", "SplitReport", "SplitScheme", "add_channels", "fan_in_shape", "split",
           "carry_optimizer_state", "load_grown", "refresh_feature_info", "save_grown", "timm_shape_string"]
