"""What every command-line tool shares: refusing a request that cannot fit, before any work."""
from __future__ import annotations

import os

from absl import app


def check_memory(num_images: int, bytes_per_image: int, advice: str) -> None:
    """Raises UsageError when `num_images` x `bytes_per_image` (what a request keeps in memory)
    is over half of this machine's memory, saying how much and `advice` (how to split it)."""
    needed = num_images * bytes_per_image
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        raise app.UsageError(
            f"{num_images:,} images need {needed / 2**30:,.1f} GiB to hold "
            f"({bytes_per_image:,} bytes each), more than half of this machine's "
            f"{total / 2**30:.0f} GiB: {advice}")
