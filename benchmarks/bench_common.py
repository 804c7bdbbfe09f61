"""Helpers shared by the benchmark scripts: peak host memory, random text embeddings, machine facts."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OVSAM_TEST_DATA", ROOT.parent / "shared" / "data"))


def status_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def with_random_embeddings(vocabulary: Any, dim: int, seed: int = 0) -> Any:
    """`vocabulary` with random unit text embeddings of the real [K, P, D] shape.

    Random weights leave no text-embedding cache, so a build would encode the vocabulary's prompt
    texts with a random text tower (minutes on CPU, before any timing); random embeddings of the
    same shape give the timed classification the same work."""
    import torch

    k, p = len(vocabulary), max(len(s) for s in vocabulary.synonyms)
    embeddings = torch.randn(k, p, dim, generator=torch.Generator().manual_seed(seed))
    vocabulary.embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return vocabulary


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU, torch and the commit, for a results table's header."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": git_commit(),
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
