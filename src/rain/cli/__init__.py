"""The `rain` command: parses, calls `rain.client`, prints."""
