"""What the user reads: the audit, text tables, report files, plots and progress bars.

* :mod:`~lipverify.report.audit` — :func:`run_audit`, the two-sided audit (bounds and certificates
  next to lower bounds and attacks);
* :mod:`~lipverify.report.files` — report.md / report.html / report.json;
* :mod:`~lipverify.report.text` — the tables the commands print;
* :mod:`~lipverify.report.plots` — PNG figures; :mod:`~lipverify.report.progress` — progress bars.

May import every analysis package (bounds, certify, attacks) and :mod:`lipverify.data`; never the CLI.
"""
