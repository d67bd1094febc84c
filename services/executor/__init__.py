"""devsilo executor: sandboxes, the helper inside them, workspaces."""
