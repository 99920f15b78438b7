"""The progress callback the library reports long work through; the CLI draws it as rich bars.

``progress(description, completed, total, info="")``: one bar per description.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[..., None]
