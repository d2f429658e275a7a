"""The control plane: slow, may block (in threads).

The domain registry and admission, ACME issuance (the only importer of
``acme``/``josepy``), renewal, probes and alerts, the admin API, doctor, keys.
"""
