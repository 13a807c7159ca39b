"""Resumable profiling. The profile is the long part of a run: it is written after every block (atomically), under
a key of everything that decides it, so a run killed at any moment and started again with the same arguments
skips the blocks it finished and ends with the same profile, hence the same plan."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .io import atomic_write_text
from .plan import Candidate
from .profile import PROFILE_ROWS, LayerProfile, Profile

log = logging.getLogger(__name__)


def run_key(source: str, calib: torch.Tensor, candidates: list[Candidate], estimator: str, **extra) -> str:
    """A digest of what decides a profile: model file (path, size, mtime), calibration ids, candidates, estimator."""
    path = Path(source)
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
    what = {"mixq": __version__, "source": str(path.resolve()),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()],
            "calib": hashlib.sha256(calib.to("cpu", torch.int64).numpy().tobytes()).hexdigest(),
            "shape": list(calib.shape), "candidates": [c.to_dict() for c in candidates], "estimator": estimator,
            "rows": PROFILE_ROWS, **extra}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass
class Checkpoint:
    path: Path
    key: str

    def load(self) -> dict[str, LayerProfile]:
        """The finished layers of an earlier run with the same key; none if there is no such run (or its file is
        unreadable: then the profile starts over)."""
        if not self.path.exists():
            return {}
        try:
            d = json.loads(self.path.read_text())
            if d.get("key") != self.key:
                log.info("%s is from other arguments: profiling from the start", self.path)
                return {}
            prof = Profile.from_json(json.dumps(d["profile"]))
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning("ignoring unreadable profile checkpoint %s (%s)", self.path, e)
            return {}
        return {lp.name: lp for lp in prof.layers}

    def save(self, prof: Profile) -> None:
        atomic_write_text(self.path, json.dumps({"key": self.key, "profile": json.loads(prof.to_json())}))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
