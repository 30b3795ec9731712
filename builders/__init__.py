"""Builders: source pushed with git becomes an OCI image built in a contained process (DESIGN §6).

Not built yet; see docs/architecture.md for what lands here.
"""
