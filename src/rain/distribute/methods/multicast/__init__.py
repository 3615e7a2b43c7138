"""`multicast`: the repository sends the image once to every node (`method`), through
udp-sender/udp-receiver (`udpcast`, the only code that runs them)."""
