"""`chunks`: nodes move only the chunks they lack, from themselves, each other,
the nodes that cache the image, then the repository (`method`)."""
