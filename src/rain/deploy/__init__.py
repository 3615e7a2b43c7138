"""The repository's side of deployments: the coordinator that moves an image to
nodes by a transfer method and starts instances there, the seed files it sends
from, the choice of method (`auto`) and the `[distribute]`/`[prefetch]` settings.

It uses the repository (images) and the methods' repository halves
(`rain.distribute.methods`); it never imports the node agent or the HTTP API.
"""
