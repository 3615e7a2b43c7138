"""BitTorrent for rain: torrents of stored images, the repository's seeder and tracker,
and the node side (rain.distribute.methods.bittorrent.method puts them together).

`config`, `torrent` and `tracker` do not need libtorrent; `session`, `seeder` and
`node` do.
"""
