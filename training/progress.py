"""Progress of a long loop: a tqdm bar on a terminal, periodic one-line logs otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Shows step, loss and steps/s. Call `update(step, loss)` as often as convenient."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        desc: str = "train",
        min_interval_s: float = 5.0,
        enabled: bool = True,
    ):
        self.total, self.desc, self.enabled = total, desc, enabled
        self._interactive = sys.stderr.isatty()
        self._min_interval = min_interval_s
        self._t0 = self._t_last = time.perf_counter()
        self._start = self._last_step = start
        self._bar = None
        if self._interactive and enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float | None = None, **extra: float) -> None:
        if not self.enabled:
            return
        fields = {} if loss is None else {"loss": f"{loss:.4g}"}
        fields.update({k: f"{v:.4g}" for k, v in extra.items()})
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(fields, refresh=False)
            return
        now = time.perf_counter()
        if now - self._t_last < self._min_interval and step < self.total:
            return
        rate = (step - self._last_step) / max(now - self._t_last, 1e-9)
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        print(
            f"[{self.desc}] step {step}/{self.total} {text} {rate:.1f} steps/s",
            file=sys.stderr,
            flush=True,
        )
        self._t_last, self._last_step = now, step

    def steps_per_second(self, step: int) -> float:
        return (step - self._start) / max(time.perf_counter() - self._t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
