"""The event loop the serving processes run on: uvloop where it is installed, else asyncio's own.

uvloop's socket writes and callbacks cost less Python per streamed token (3-5 us of the frontend's
CPU per token on the 2-core box, `benchmarks/frontend_path.py`); behaviour is the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)` on a uvloop loop when uvloop imports."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
