"""What every growth method shares, below the splitting maths and the baselines.

* :mod:`.neurons`: what a neuron is (a conv / linear output channel, its folded norm and its nonlinearity,
  :func:`~.neurons.activation_kind`), and which layers have neurons to grow (:func:`~.neurons.splittable_layers`).
* :mod:`.channel_cost`: the MACs / cost-model price of one more channel per layer, exact MACs after a set of
  additions, and the longest prefix of a ranked list that fits a budget (:func:`~.channel_cost.prefix_within_macs`);
  the energy-aware LP (Wang et al. 2019) and every baseline's budget cut read it.
* :mod:`.variance`: variance transfer for new channels (Yuan, Savarese & Maire, NeurIPS 2023): fan-in growth
  factors and the rescaling that keeps activations' variance.
* :mod:`.rates`: learning-rate adaptation per growth stage (Yuan et al. 2023) and μP's per-layer factors
  (Yang et al. 2022).
* :mod:`.depth`: growing in depth: new blocks and layers that keep the function (a residual block with its last
  norm zeroed; Net2DeeperNet's identity, Chen et al. 2016), and the MAC budget cut of width and depth together.
* :mod:`.depth_scores`: Firefly's first-order score of a new block (Wu et al. 2020), the mixed width / depth
  selection, and one round's depth step of a growth method (:func:`~.depth_scores.grow_depth`, ``growth.depth``).
"""
