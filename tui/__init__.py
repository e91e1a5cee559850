"""`cdcca tui`: the Textual window onto the device (see tui/app.py)."""
