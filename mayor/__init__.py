"""The Mayor: the per-machine init that reconciles process tables into runc containers (DESIGN §5).

Not built yet; see docs/architecture.md for what lands here.
"""
