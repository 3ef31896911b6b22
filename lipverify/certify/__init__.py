"""Certified radii: the global GloRo rule and IBP-masked local certification.

* :mod:`~lipverify.certify.rules` — :func:`certify`, the per-input records and results (eps parsing
  and keys: :mod:`lipverify.arguments`, re-exported here);
* :mod:`~lipverify.certify.local` — local certificates by bisection over eps;
* :mod:`~lipverify.certify.properties` — general output properties (VNN-LIB) on their input box.

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
    progress_total,
    repr_eps,
)
from lipverify.certify.properties import box_radius, certify_properties

__all__ = ["CertifyResult", "InputCertificate", "box_radius", "certified_at", "certify", "certify_properties",
           "global_radii", "parse_eps", "progress_total", "repr_eps"]
