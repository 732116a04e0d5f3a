"""The local web page and its JSON API (``vramplan serve``; needs the ``[web]`` extra).

``vramplan.web.app.create_app()`` builds the ASGI app. Importing this package needs nothing beyond
the core; the app module needs starlette.
"""

from __future__ import annotations

__all__: list[str] = []
