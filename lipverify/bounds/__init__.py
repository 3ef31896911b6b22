"""Proven upper bounds over the Lipschitz graph: global and margin bounds, local (IBP-masked) bounds,
LipSDP.

* :mod:`~lipverify.bounds.global_bound` — propagation of layer constants, margin constants ``K_ij``;
* :mod:`~lipverify.bounds.local` — local bounds on an eps-ball;
* :mod:`~lipverify.bounds.jacobian` — Clarke-Jacobian interval bounds of local margin constants;
* :mod:`~lipverify.bounds.lipsdp`, :mod:`~lipverify.bounds.lipsdp_graph` — LipSDP-Neuron/-Layer;
* :mod:`~lipverify.bounds.eclipse` — compositional dense-chain bounds (ECLipsE-Fast and its polish).

May import :mod:`lipverify.graph`, :mod:`lipverify.results` and :mod:`lipverify.errors`; never
:mod:`lipverify.attacks` (the empirical side, which checks these bounds) nor the CLI.
"""
