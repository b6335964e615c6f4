"""The Kubernetes operator: kopf handlers that drive the same engine as the CLI.

``main`` only registers handlers; each handler's body lives in its own module
(reconcile, refresh daemon, deletion). Status is kstatus-compatible so Flux and
Argo CD read health without custom scripts.
"""
