"""The typed Lipschitz graph: what every analysis reads.

* :mod:`~lipverify.graph.nodes` — :class:`LipschitzGraph` and its nodes (linear operators, activations
  with slope ranges, max pooling, residual adds, concatenations);
* :mod:`~lipverify.graph.linear_ops` — linear operators with forward, adjoint and bias (dense,
  convolution, element-wise scale, coordinate selection, chains, residuals), each able to bound its own
  operator norm (the per-operator strategy) and to keep its power-iteration vector;
* :mod:`~lipverify.graph.operator_norms` — the numerical kernels those operators use (exact SVD, FFT
  bound for convolutions, Gram iteration, power iteration);
* :mod:`~lipverify.graph.simplify` — merging affine chains;
* :mod:`~lipverify.graph.domain` — interval bounds of every node over an input box, and the
  domain-dependent constants of products and normalisations.

May import :mod:`lipverify.errors` and itself only: no importer, analysis, attack, report or CLI.
"""

from lipverify.graph.nodes import (
    Activation,
    Attention,
    LipschitzGraph,
    MaxPool,
    Node,
    Normalization,
    apply_node,
    make_activation,
    minmax,
)

__all__ = ["Activation", "Attention", "LipschitzGraph", "MaxPool", "Node", "Normalization", "apply_node", "make_activation", "minmax"]
