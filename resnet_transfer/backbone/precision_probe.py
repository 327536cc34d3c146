"""`rt finetune --precision auto` on a CPU: time the train step in fp32 and in bf16, keep the faster.

Whether bf16 autocast pays for a *training* step depends on the CPU and the shape: on an Intel host with AMX
it lost for ResNet-18 at 32 px (244 ms bf16 vs 206 ms fp32 per step of 64), while for large inputs its
matrix units win; on CPUs with AVX512-BF16 but no AMX the balance is different again (docs/finetune.md has
this host's figures). So instead of a rule, a short probe: a copy of the model, in the configuration it
trains in longest (every planned stage unfrozen), runs forward + backward on a synthetic batch of the run's
shape, interleaved fp32 / bf16, a warm-up and ``ROUNDS`` timed steps each; the median decides. The probe
never touches the run's model, optimiser or random streams (a deep copy, ``torch.random.fork_rng``), so a run
is as reproducible as with a fixed precision, and the choice is kept in the checkpoint for ``--resume``.

What a probe measured is kept in this host's speed records (:mod:`speed_records`, work id
``<arch>|train-<precision>-p<trainable tensors>|NxCxHxW``, seconds per image, the same figure `rt finetune`'s
timed eager steps add to): a later run of the same model, shape and trainable set reads both precisions
there and does not probe again (``{"mode": "records"}``).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from ..base import UsageError

ROUNDS = 3
# a probe costs about 2 * (ROUNDS + 1) steps; below this many planned steps it is not worth it and the
# rule (bf16 where the CPU has it, the inference default) is used
MIN_STEPS_FOR_PROBE = 100


def choose_train_precision(
    option: str,
    device: Any,
    model: Any,
    policy: Any,
    input_shape: tuple[int, ...],
    batch: int,
    total_steps: int,
    arch: str = "",
) -> tuple[str, dict[str, Any]]:
    """The precision of the train step and how it was chosen (``{"mode": "given" | "rule" | "probe", ...}``,
    recorded in report.json). ``option`` is ``--precision``; ``model`` the run's classifier (not modified);
    ``arch`` its architecture (the speed records' work id)."""
    from ..base import cpu_supports_bf16, resolve_precision
    from .speed_records import read, record

    precision = resolve_precision(option, device)
    if precision == "int8":
        raise UsageError(
            "--precision int8 is for inference (rt extract, rt predict), not for training",
            "train with --precision bf16 or fp32 (auto picks the faster one)",
        )
    if option != "auto":
        return precision, {"mode": "given"}
    if device.type != "cpu" or not cpu_supports_bf16():
        return precision, {"mode": "rule", "reason": f"auto on {device.type}: {precision}"}
    if total_steps < MIN_STEPS_FOR_PROBE:
        return precision, {
            "mode": "rule",
            "reason": f"{total_steps} planned steps (< {MIN_STEPS_FOR_PROBE}): too short to repay a timing probe",
        }
    works = train_works(arch, model, policy, (batch, *input_shape), ("fp32", "bf16"))
    known = {p: read(device, w).get("eager_s") for p, w in works.items()}
    if all(known.values()):
        best = min(known, key=lambda p: known[p])  # type: ignore[arg-type, return-value]
        ms = {p: round(1000 * float(v) * batch, 1) for p, v in known.items()}  # type: ignore[arg-type]
        return best, {"mode": "records", "median_ms": ms, "shape": [batch, *input_shape]}
    ms = probe_step_ms(model, policy, input_shape, batch, device, ("fp32", "bf16"))
    for p, w in works.items():
        record(device, w, eager_s=statistics.median(ms[p]) / 1000 / batch)
    best = min(ms, key=lambda p: statistics.median(ms[p]))
    info = {
        "mode": "probe",
        "median_ms": {p: round(statistics.median(v), 1) for p, v in ms.items()},
        "samples_ms": {p: [round(x, 1) for x in v] for p, v in ms.items()},
        "shape": [batch, *input_shape],
    }
    return best, info


def train_works(
    arch: str, model: Any, policy: Any, shape: tuple[int, ...], precisions: tuple[str, ...]
) -> dict[str, str]:
    """The speed-record work ids of the train step with every planned stage trainable, per precision."""
    from .speed_records import work_id

    last = policy.last_start
    flags = [p.requires_grad for p in model.parameters()]
    policy.apply(last)
    trainable = sum(p.requires_grad for p in model.parameters())
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return {p: work_id(arch or "unnamed", f"train-{p}-p{trainable}", shape) for p in precisions}


def probe_step_ms(
    model: Any, policy: Any, input_shape: tuple[int, ...], batch: int, device: Any, precisions: tuple[str, ...]
) -> dict[str, list[float]]:
    """Milliseconds of forward + backward per precision on a copy of ``model`` with every planned stage
    trainable, interleaved (one warm-up each, then ``ROUNDS`` timed rounds)."""
    import torch

    from ..base import autocast

    with torch.random.fork_rng(devices=[]):
        last = policy.last_start
        flags = [p.requires_grad for p in model.parameters()]
        modes = [m.training for m in model.modules()]
        policy.apply(last)
        policy.train_mode(last)
        probe = copy.deepcopy(model)
        for p, f in zip(model.parameters(), flags):  # the run's model as it was
            p.requires_grad_(f)
        for m, t in zip(model.modules(), modes):
            m.train(t)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *input_shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        n_classes = int(getattr(probe.head, "num_classes", 2))
        y = torch.randint(0, n_classes, (batch,), generator=g).to(device)

        def step(precision: str) -> float:
            t0 = time.perf_counter()
            with autocast(device, precision):
                logits = probe(x)
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            for p in probe.parameters():
                p.grad = None
            return (time.perf_counter() - t0) * 1000

        out: dict[str, list[float]] = {p: [] for p in precisions}
        for p in precisions:
            step(p)  # warm-up: oneDNN primitive creation, allocator
        for _ in range(ROUNDS):
            for p in precisions:
                out[p].append(step(p))
    return out
