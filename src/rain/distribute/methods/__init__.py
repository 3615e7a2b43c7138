"""Transfer methods, one folder each (`http`, `tree`, `multicast`, `bittorrent`, `chunks`):
each `<name>/method.py` holds the node half (`NODE`) and the repository half
(`COORDINATOR`) behind the protocols in `base`."""
