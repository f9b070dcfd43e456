"""The maths of splitting steepest descent (S2D, fast / energy-aware splitting, S3D), one file per part of the papers.

* :mod:`.activations`: σ'' of each activation (ReLU and ReLU6 through a softplus surrogate of curvature β).
* :mod:`.analysis`: the splitting matrix ``S_o = E[Σ_l g σ''(u) a² p_l p_lᵀ]`` and its extreme eigenpairs, exactly
  (S2D: Liu, Wu & Wang, NeurIPS 2019) or by Rayleigh-quotient SGD at the cost of back-propagation (fast splitting:
  Wang, Li, Wu, Liu, arXiv 2019).
* :mod:`.schemes`: S2D's two copies ``θ ± ε v_min`` and S3D's signed splits with their second-order gains (S3D:
  Wu, Liu, Stone, Liu, NeurIPS 2020).
* :mod:`.variants`: the table of variants (``s2d``, ``fast``, ``s3d``, ``s3d-exact``, ``energy``), each an
  analysis function and a scheme function; everything else reads this table.
* :mod:`.selection`: which splits to make: a grow ratio with per-group quotas, or the energy-aware linear program
  (fast energy-aware splitting) solved with ``scipy.optimize.linprog``.

What a neuron is, what a channel costs, variance transfer and learning-rate adaptation are shared with the other
growth methods and live in :mod:`nas_split.growth`.
"""
