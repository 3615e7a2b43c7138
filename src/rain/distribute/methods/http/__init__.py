"""`http`: every node fetches the image from the repository (Range requests of chunk runs)."""
