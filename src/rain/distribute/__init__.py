"""How image bytes move from the repository to compute nodes: what both sides share.

The transfer methods (`rain.distribute.methods.<name>`, one folder each, both
halves behind `methods/base.py`) and the plumbing they and both sides use: the
image a node fills and verifies chunk by chunk (`partial`), the repository as
a chunk source (`source`), the threaded HTTP server (`httpserver`) and the
client of the agent API (`agentclient`). The node agent (`rain.agent`) and the
repository's deployments (`rain.deploy`) build on these; this package imports
neither.
"""
