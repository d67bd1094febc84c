"""`silo tui`: the devsilo terminal UI (Textual)."""
