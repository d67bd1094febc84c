"""devsilo gateway: the only thing a client talks to."""
