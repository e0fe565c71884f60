"""Causal tests of claims about neurons: interventions, held-out verification against matched nulls, q-values."""
