"""dockyard: the storage side of a Docker fleet — deploys for pyinfra plus a bundled layer and
registry core that the deploy installs on every host."""

from __future__ import annotations

__version__ = "0.1.0"
