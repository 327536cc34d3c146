"""The train step's compile, decided as extract's forward is (`rt finetune --compile auto|on|off`).

:class:`TrainCompile` stands in for the run's ``train_forward`` (same call, same ``loss_weight``): the
classifier's forward eager, or through ``torch.compile`` (dynamo + AOTAutograd: the backward of the
compiled forward is compiled too). ``train_one_epoch`` tells it where each step starts and ends
(:meth:`TrainCompile.step_done`, the optimiser step included), so with ``auto`` it can weigh, with
:func:`base.compile_plan` and this host's speed records (:mod:`backbone.speed_records`, work id
``<arch>|train-<precision>-p<trainable tensors>|NxCxHxW``):

- compiled and eager step rates both recorded here: compile when the steps left repay the compile;
- the compiled step never measured here and the run long enough to repay a compile at a plausible
  speed-up: *measure*: :data:`TRIAL_STEPS` timed eager steps, compile, as many timed compiled steps, keep
  the faster for the rest of the run, record both (one log line says what it measured and chose);
- a short run: eager, never waiting for a compile.

The freeze policy works with it: frozen stages (``requires_grad`` False, BatchNorm in eval) are part of the
graph dynamo traces and guards on, so an unfreeze at a later epoch recompiles once (timed and recorded like
the first). A compile that fails in the forward falls back to eager for the run, with a warning. Under
torchrun (DDP) ``auto`` stays eager (a compiled DDP module is a different set of trade-offs, unmeasured).
"""

from __future__ import annotations

import time
from typing import Any

from ..base import COMPILE_MODES, UsageError, compile_plan, get_reporter

TRIAL_STEPS = 3


class TrainCompile:
    """``train_forward`` with the compile decided on this host (see the module doc)."""

    def __init__(
        self, inner: Any, device: Any, precision: str, mode: str, total_steps: int, batch: int, arch: str
    ) -> None:
        m = str(mode).lower()
        if m not in COMPILE_MODES:
            raise UsageError(f"--compile {mode!r} is not known", "use auto, on or off")
        self.inner, self.device, self.precision, self.mode = inner, device, precision, m
        self.total_steps, self.batch, self.arch = int(total_steps), int(batch), arch or "unnamed"
        self.distributed = getattr(inner, "_module", None) is not None
        self.compiled: bool | None = False if m == "off" or (m == "auto" and self.distributed) else None
        self.choice: dict[str, Any] = {"mode": m}
        self._fn: Any = None
        self._shape: tuple[int, ...] = ()
        self._key: tuple[bool, ...] | None = None
        self._steps = 0
        self._t0: float | None = None
        self._eager: list[float] = []  # seconds per image of timed eager steps
        self._comp: list[float] = []  # ... of timed compiled steps
        self._compile_s: float | None = None
        self._measuring = False
        self._pending_compile = False  # the next step runs compiled for the first time (its time = compile)

    # -------------------------------------------------------------------------------- the forward

    def loss_weight(self, n_local: int) -> float:
        return float(self.inner.loss_weight(n_local))

    def __call__(self, x: Any) -> Any:
        self._shape = tuple(x.shape)
        self._t0 = time.perf_counter()
        key = tuple(p.requires_grad for p in self.inner.module.parameters())
        if key != self._key:  # another set of trainable parameters (an unfreeze): decide anew
            self._new_configuration(key)
        if self.compiled is None and self.mode == "on":
            self._compile()
        if self._fn is not None and self.compiled:
            try:
                return self._fn(x)
            except Exception as exc:  # inductor could not compile this graph here
                if self.mode == "on":
                    raise
                self._fallback(exc)
        return self.inner(x)

    def step_done(self, n_images: int) -> None:
        """The step that began at the last call ended (after the optimiser step): time it and decide."""
        if self._t0 is None or self.mode == "off" or self.distributed:
            return
        if self.device.type == "cuda" and (self.compiled is None or self._measuring):
            import torch

            torch.cuda.synchronize()
        dt, self._t0 = time.perf_counter() - self._t0, None
        self._steps += 1
        if self._pending_compile:
            self._pending_compile, self._compile_s = False, dt
            self.choice["compile_s"] = round(dt, 2)
            return
        if n_images != self.batch or self._steps == 1:
            return  # a partial batch, or the cold first step: not a fair timing
        (self._comp if self.compiled else self._eager).append(dt / n_images)
        if self.compiled is None and len(self._eager) >= TRIAL_STEPS and self.mode == "auto":
            self._decide()
        elif self._measuring and len(self._comp) >= TRIAL_STEPS:
            self._settle()

    # -------------------------------------------------------------------------------- the decision

    @property
    def work(self) -> str:
        from ..backbone import work_id

        trainable = sum(self._key or ())
        return work_id(self.arch, f"train-{self.precision}-p{trainable}", self._shape)

    def _new_configuration(self, key: tuple[bool, ...]) -> None:
        if self._key is not None:
            self.finish()  # what the previous configuration measured
        self._key = key
        self._eager, self._comp, self._steps = [], [], 0
        if self.compiled is False and self._fn is None and self.mode == "auto" and not self.distributed:
            self.compiled = None  # eager by choice for the last configuration: decide again
        if self.compiled:
            self._pending_compile = True  # dynamo recompiles for the new flags: time it as a compile

    def _decide(self) -> None:
        from ..backbone import read_speed

        eager = sorted(self._eager)[len(self._eager) // 2]
        rec = read_speed(self.device, self.work)
        left = max(0, self.total_steps - self._steps) * self.batch
        action, why = compile_plan(
            left, rec.get("eager_s", eager), rec.get("compiled_s"), rec.get("compile_cold_s"), False, self.device,
            2 * TRIAL_STEPS * self.batch,
        )  # fmt: skip
        self.choice.update(action=action, why=why, eager_ms_per_image=round(1000 * eager, 3))
        get_reporter().info(
            f"compile auto (train step): {self.work}: eager {1000 * eager:.1f} ms/img; {why} -> "
            + ("compiling once to measure it" if action == "measure" else action)
        )
        if action == "eager":
            self.compiled = False
            return
        self._measuring = action == "measure"
        self._compile()

    def _compile(self) -> None:
        import torch

        self._fn = torch.compile(self.inner.module)
        self.compiled = True
        self._pending_compile = True

    def _settle(self) -> None:
        self._measuring = False
        eager = sorted(self._eager)[len(self._eager) // 2]
        comp = sorted(self._comp)[len(self._comp) // 2]
        keep = comp < eager
        if not keep:
            self.compiled, self._fn = False, None
        self.choice.update(compiled_ms_per_image=round(1000 * comp, 3), kept="compiled" if keep else "eager")
        get_reporter().info(
            f"compile auto (train step): measured on this host for {self.work}: eager {1000 * eager:.1f} ms/img, "
            f"compiled {1000 * comp:.1f} ms/img, compile {self._compile_s or 0:.0f} s -> "
            f"{'compiled' if keep else 'eager'} for the rest of the run; recorded for later runs"
        )

    def _fallback(self, exc: Exception) -> None:
        self.compiled, self._fn, self._measuring, self._pending_compile = False, None, False, False
        self.choice["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        get_reporter().warn(f"--compile {self.mode}: the train step's compile failed ({self.choice['failed']}); eager")

    def finish(self) -> None:
        """Record what this configuration measured (medians of the timed steps) in the speed records."""
        if not self._key or self.distributed or not (self._eager or self._comp):
            return
        if self.compiled is None or self._measuring:
            return  # still deciding: recorded once decided
        from ..backbone import record_speed

        def med(v: list[float]) -> float | None:
            return sorted(v)[len(v) // 2] if v else None

        record_speed(
            self.device, self.work, eager_s=med(self._eager), compiled_s=med(self._comp), compile_cold_s=self._compile_s
        )
        self._eager, self._comp, self._compile_s = [], [], None  # recorded once (the next epoch adds its own)
