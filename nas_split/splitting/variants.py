"""The splitting variants, in one table: which analysis estimates the spectra and which scheme turns a neuron's
spectrum into a split.  The :class:`~nas_split.Grower`, the growth configuration, the CLI's help, the method
registry (``run`` / ``compare``) and the NNI strategy all read :data:`VARIANTS`; a new variant is one entry.

==========  ===========================================  ==============================  ============
name        analysis                                     scheme                          selection
==========  ===========================================  ==============================  ============
s2d         exact matrices + ``eigh`` (S2D, Liu 2019)    two copies ``θ ± ε v_min``      ratio
fast        Rayleigh-quotient SGD (Wang 2019), ``v_min``  two copies                      ratio
s3d         Rayleigh-quotient SGD, ``v_min`` and ``v_max``  best signed split (Wu 2020)   ratio
s3d-exact   exact matrices, both ends                    best signed split               ratio
energy      Rayleigh-quotient SGD, ``v_min``             two copies                      LP over costs
==========  ===========================================  ==============================  ============
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .analysis import Spectrum, exact_spectrum, fast_spectrum
from .schemes import NeuronSplit, best_s3d_split, s2d_split

#: The functions below take the :class:`~nas_split.Grower` that runs them (its model, neurons and options); it is
#: typed loosely because the Grower sits above this table.
Grower = Any

__all__ = ["Variant", "VARIANTS", "exact_analysis", "fast_analysis", "s2d_scheme", "s3d_scheme"]


def exact_analysis(g: Grower, loader: Iterable, ends: tuple[str, ...]) -> dict[str, Spectrum]:
    """Exact splitting matrices, both ends of every spectrum (``ends`` is implied)."""
    return exact_spectrum(g.model, loader, g.neurons(), g.loss_fn, g.beta, g.analysis_batches)


def fast_analysis(g: Grower, loader: Iterable, ends: tuple[str, ...]) -> dict[str, Spectrum]:
    """Rayleigh-quotient SGD for the ``ends`` asked for, warm-started from the Grower's last spectra."""
    return fast_spectrum(g.model, loader, g.neurons(), g.loss_fn, g.beta, g.fast_passes, g.analysis_batches or 20,
                         g.fast_lr, ends, g.spectra, g.generator)


def s2d_scheme(g: Grower, layer: str, o: int, sp: Spectrum) -> NeuronSplit:
    """S2D: two copies along ``±v_min`` (gain ``λ_min``)."""
    return s2d_split(layer, o, float(sp.lam_min[o]), sp.v_min[o])


def s3d_scheme(g: Grower, layer: str, o: int, sp: Spectrum) -> NeuronSplit:
    """S3D: the best split of the neuron under the Grower's mass budget ``c``, copy count and ranking
    (``s3d_rank``: gain per added neuron, or total gain)."""
    return best_s3d_split(layer, o, float(sp.lam_min[o]), sp.v_min[o], float(sp.lam_max[o]), sp.v_max[o], g.c,
                          g.max_copies, g.s3d_rank)


@dataclass(frozen=True)
class Variant:
    """A splitting variant: its analysis and scheme functions and what follows from them.

    Attributes:
        analysis: ``(grower, loader, ends) -> {layer: Spectrum}``.
        scheme: ``(grower, layer, neuron, spectrum) -> NeuronSplit``.
        ends: spectrum ends the scheme needs (``"min"``; S3D also ``"max"``).
        energy_aware: select with the LP over channel costs instead of the grow ratio.
        max_round_factor: most a round can multiply MACs by (two copies double a layer's widths on both sides;
            S3D's four copies quadruple them).
    """

    name: str
    analysis: Callable[..., dict[str, Spectrum]]
    scheme: Callable[..., NeuronSplit]
    ends: tuple[str, ...]
    description: str
    energy_aware: bool = False
    max_round_factor: float = 4.0


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("s2d", exact_analysis, s2d_scheme, ("min",), "exact splitting matrices, S2D splits"),
    Variant("fast", fast_analysis, s2d_scheme, ("min",), "Rayleigh-quotient analysis, S2D splits"),
    Variant("s3d", fast_analysis, s3d_scheme, ("min", "max"), "fast analysis of both ends, signed splits",
            max_round_factor=16.0),
    Variant("s3d-exact", exact_analysis, s3d_scheme, ("min", "max"), "exact matrices, signed splits",
            max_round_factor=16.0),
    Variant("energy", fast_analysis, s2d_scheme, ("min",), "fast analysis, S2D splits, LP over channel costs",
            energy_aware=True),
)}
