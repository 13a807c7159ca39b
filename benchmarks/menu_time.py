"""The profile's time per default menu, in one process: the first blocks of SmolLM2-135M profiled (default solver and
estimator, 8 calibration windows) over the default menu and over the same menu with normal-float levels in place of
the learned ones, to compare menus on whatever machine runs it (the default run's own seconds depend on the machine).

    python benchmarks/menu_time.py --blocks 2        prints the seconds of each menu
"""
from __future__ import annotations

import argparse
import time

import torch

from mixq import data
from mixq.config import DEFAULT_FORMATS, default_candidates
from mixq.models import load_model
from mixq.profile import profile_model

MENUS = {"nf": tuple((f[0], "nf", *f[2:]) if f[1] == "lk" else f for f in DEFAULT_FORMATS), "lk": DEFAULT_FORMATS}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--menus", nargs="+", default=list(MENUS), choices=list(MENUS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model(None)
    model.model.layers = model.model.layers[:args.blocks]
    model.config.num_hidden_layers = args.blocks
    calib = data.calibration_windows(tok)[:8]
    for name in args.menus:
        t = time.perf_counter()
        profile_model(model, calib, default_candidates(formats=MENUS[name]), "oac")
        print(f"{name}: {time.perf_counter() - t:.1f} s for {args.blocks} blocks", flush=True)


if __name__ == "__main__":
    main()
