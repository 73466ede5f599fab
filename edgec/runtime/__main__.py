"""``python -m edgec.runtime MODEL.onnx --input x.npy`` / ``--bench`` (see ``main``)."""
from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
