"""Shared test set-up: the repository root on sys.path so `dockyard_deploys` imports as in
pyinfra runs."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
