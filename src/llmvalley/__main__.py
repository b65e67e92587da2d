"""``python -m llmvalley``: the ``valley`` command, so that ``torchrun -m llmvalley train ...``
starts it in every process."""

import sys

from llmvalley.cli import main

if __name__ == "__main__":
    sys.exit(main())
