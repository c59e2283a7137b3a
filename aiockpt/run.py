"""``python -m aiockpt.run``: the same launcher as ``aiockpt-run`` (see aiockpt.elastic.cli)."""

from __future__ import annotations

from aiockpt.elastic.cli import main

if __name__ == "__main__":
    main()
