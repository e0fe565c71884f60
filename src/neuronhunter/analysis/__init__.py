"""Analysis on top of scans: selectivity and verdicts, interventions, attention heads, probes."""
