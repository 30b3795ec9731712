"""The master: the authoritative keg served over HTTP and FastCGI, single-node or Raft (DESIGN §4).

Not built yet; see docs/architecture.md for what lands here.
"""
