"""Time of one ``AutoClip.threshold`` step against the ``torch.nanquantile`` form it replaced.

Both keep the same ring buffer of the last ``window`` finite norms; the previous form
took ``torch.nanquantile`` of it every step. The current one reads ``nanquantile``'s
two ranks and weight from tables computed once, from the window sorted once per step
(a global norm) or kept sorted by one removal and one insertion (per-layer norms). Both run in
one process, interleaved, on a full window (the steady state), for a global norm
(a scalar) and per-layer norms (vectors). Reported: the median over rounds of each
form's mean time per step, and their ratio.

Usage::

    python benchmarks/autoclip_threshold.py                 # ~30 s on a CPU
    python benchmarks/autoclip_threshold.py --device cuda --rounds 15
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gradguard.functional.policies import AutoClip


class PreviousAutoClip:
    """The previous ``AutoClip.threshold``: ``torch.nanquantile`` of the window every step."""

    def __init__(self, percentile: float, window: int) -> None:
        self.q, self.window = percentile / 100.0, window
        self.history: Tensor | None = None
        self.position = torch.zeros(())

    def threshold(self, norm: Tensor) -> Tensor:
        norm = norm.to(torch.float64)
        if self.history is None:
            shape = (self.window, *norm.shape)
            self.history = torch.full(shape, math.nan, dtype=torch.float64, device=norm.device)
            self.position = torch.zeros(norm.shape, dtype=torch.long, device=norm.device)
        finite = torch.isfinite(norm)
        slot = (self.position % self.window).unsqueeze(0)
        written = self.history.scatter(0, slot, norm.unsqueeze(0))
        self.history = torch.where(finite, written, self.history)
        self.position = self.position + finite.long()
        threshold = torch.nanquantile(self.history, self.q, dim=0)
        return torch.nan_to_num(threshold, nan=math.inf)


def _time_per_step(
    step: Callable[[Tensor], Tensor], norms: Tensor, sync: Callable[[], None]
) -> float:
    sync()
    start = time.perf_counter()
    for norm in norms:
        step(norm)
    sync()
    return (time.perf_counter() - start) / len(norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=500, help="steps per round and form")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", default="0,12,200", help="0 is the global (scalar) norm")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"AutoClip threshold step, window={args.window}, {device}, torch {torch.__version__}")
    print(f"{'norms':>8} {'previous':>14} {'current':>12} {'ratio':>7}")
    for layers in (int(n) for n in args.layers.split(",")):
        shape = () if layers == 0 else (layers,)
        generator = torch.Generator().manual_seed(0)
        norms = torch.rand((args.steps, *shape), generator=generator, dtype=torch.float64)
        norms = norms.to(device)
        previous, current = PreviousAutoClip(10.0, args.window), AutoClip(10.0, args.window)
        fill = torch.rand((args.window + 1, *shape), generator=generator, dtype=torch.float64)
        for norm in fill.to(device):  # fill the window (the steady state); same thresholds
            if not torch.equal(previous.threshold(norm), current.threshold(norm)):
                raise SystemExit("the two forms disagree: this benchmark compares nothing")
        times: dict[str, list[float]] = {"previous": [], "current": []}
        for round_index in range(args.rounds):
            order = [("previous", previous), ("current", current)]
            for name, policy in order[:: 1 if round_index % 2 == 0 else -1]:
                times[name].append(_time_per_step(policy.threshold, norms, sync))
        old, new = (statistics.median(times[k]) * 1e6 for k in ("previous", "current"))
        label = "global" if layers == 0 else f"{layers}"
        print(f"{label:>8} {old:>11.1f} us {new:>9.1f} us {new / old:>6.2f}x")


if __name__ == "__main__":
    main()
