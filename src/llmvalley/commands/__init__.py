"""Sub-commands of the ``valley`` CLI, one module each."""
