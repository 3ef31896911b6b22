"""Certified radii: the global GloRo rule and IBP-masked local certification.

* :mod:`~lipverify.certify.rules` — :func:`certify`, the per-input records and results, eps parsing;
* :mod:`~lipverify.certify.local` — local certificates by bisection over eps.

May import :mod:`lipverify.bounds`, :mod:`lipverify.graph` and :mod:`lipverify.errors`; never the
attacks (an independent check of certificates must stay independent), reports or the CLI.
"""

from lipverify.certify.rules import (
    CertifyResult,
    InputCertificate,
    certified_at,
    certify,
    global_radii,
    parse_eps,
    repr_eps,
)

__all__ = ["CertifyResult", "InputCertificate", "certified_at", "certify", "global_radii", "parse_eps",
           "repr_eps"]
