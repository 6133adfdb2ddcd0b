"""Old name of the sweep job entry, kept for sweeps started before the sweep code moved to
``dpft.sweeps``: their running parents still start ``python -m dpft.launch``. New sweeps run
``python -m dpft.sweeps.job``. Delete once no sweep planned before the move is still running."""

import sys

from dpft.sweeps.job import main

if __name__ == "__main__":
    sys.exit(main())
