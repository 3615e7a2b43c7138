"""Helpers that several test modules share, by what they make (images, catalog rows,
node reports, build templates). A test module never imports another test module:
tests/test_layout.py fails if one does."""
