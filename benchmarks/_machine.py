"""What every benchmark prints first: the CPU it ran on and the flags that decide its speed
(the project's machines change between a Xeon with AMX-BF16 and an AMD EPYC with AVX512-BF16)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line() -> str:
    """``<model name>, N CPUs; flags: ...`` from /proc/cpuinfo (platform's name elsewhere)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = " ".join(f for f in FLAGS if f in flags) or "none of " + "/".join(FLAGS)
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; flags: {shown}"
