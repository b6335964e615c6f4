"""The API: spec types, the CRD-driven schema check, validation, and the one audited door for user SQL.

Pure: knows nothing about databases or Kubernetes.
"""
