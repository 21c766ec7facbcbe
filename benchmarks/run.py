"""Regenerate benchmarks/RESULTS.md: gsnr-diag end to end against Opacus and torch.func (benchmarks/e2e.py).

    python benchmarks/run.py                  # all models, all columns, 1 thread, CPU (about 10-15 minutes)
    python benchmarks/run.py --device cuda    # the same on a GPU (wall clock) → RESULTS_cuda.json, then re-render
    python benchmarks/run.py --quick          # a smoke run of the plumbing (256 samples, few repetitions)
    python benchmarks/run.py --per-chunk      # the earlier per-chunk protocol → RESULTS_per_chunk.md

The per-chunk protocol (below) times one chunk inside a call:

Speed: for every (model, batch, threads) each method's step is timed interleaved with a plain
forward+backward (plain, method, plain) in the same process; the ratio of each repetition is the
method's time over the mean of the two plain times around it, and the table gives the median.
Wall-clock ratios, and for 1 thread also thread-CPU-time ratios (robust when the machine is shared).
Memory: each method runs in its own subprocess; after one warm-up step the peak RSS is reset
(/proc/self/clear_refs) and the extra memory is the peak RSS of one more step over the RSS before it.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CONFIGS = [
    ("cnn", 64),
    ("cnn", 256),
    ("mlp", 64),
    ("mlp", 256),
    ("mlp", 1024),
    ("sequence", 64),
    ("sequence", 256),
    ("transformer", 64),
    ("transformer", 256),
]
MEMORY_CONFIGS = [("cnn", 256), ("mlp", 256), ("mlp", 1024), ("sequence", 256), ("transformer", 256)]
MEMORY_METHODS = [
    "plain",
    "gsnr-diag",
    "gsnr-diag signs=False",
    "gsnr-diag gradient_stats()",
    "opacus",
    "torch.func",
    "backpack BatchGrad",
    "backpack SumGradSquared (no signs)",
    "loop",
]
PER_SAMPLE_METHODS = {"opacus", "torch.func", "backpack BatchGrad", "loop"}
SKIP_PER_SAMPLE = {
    ("mlp", 1024): "skipped: per-sample gradients of 1024 x 669,706 parameters take 2.7 GB in float32 "
    "before the float64 reduction, and the loop would take ~1 min per repetition "
    "(shared 2-core machine)"
}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # memory children: large blocks are returned to the OS on free


# --- children ----------------------------------------------------------------------------------
def _time_child(threads: int, budget_s: float, configs) -> dict:
    import torch
    from common import METHODS, make

    torch.set_num_threads(threads)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = {}
    for model_name, batch in configs:
        model, X, Y = make(model_name, batch)
        plain = METHODS["plain"](model, X, Y, loss_fn)
        for _ in range(2):
            plain()
        for name, factory in METHODS.items():
            if name == "plain":
                continue
            key = f"{model_name}|{batch}|{name}"
            if (model_name, batch) in SKIP_PER_SAMPLE and name in PER_SAMPLE_METHODS:
                out[key] = {"error": SKIP_PER_SAMPLE[(model_name, batch)]}
                continue
            try:
                step = factory(model, X, Y, loss_fn)
                t0 = time.perf_counter()
                step()  # warm-up (and plan settling)
                first = time.perf_counter() - t0
                p0 = time.perf_counter()
                plain()
                tp = time.perf_counter() - p0
                reps = int(max(3, min(21, budget_s / max(first + 2 * tp, 1e-6))))
                wall, cpu, plain_ms = [], [], []
                for _ in range(reps):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    plain()
                    w1, c1 = time.perf_counter(), time.thread_time()
                    step()
                    w2, c2 = time.perf_counter(), time.thread_time()
                    plain()
                    w3, c3 = time.perf_counter(), time.thread_time()
                    wall.append((w2 - w1) / ((w1 - w0 + w3 - w2) / 2))
                    cpu.append((c2 - c1) / max((c1 - c0 + c3 - c2) / 2, 1e-9))
                    plain_ms.append(1e3 * (w1 - w0 + w3 - w2) / 2)
                paths = getattr(getattr(step, "capture", None), "paths", None)
                out[key] = {
                    "wall": statistics.median(wall),
                    "cpu": statistics.median(cpu),
                    "reps": reps,
                    "plain_ms": statistics.median(plain_ms),
                    "paths": paths,
                }
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            print(key, out[key], file=sys.stderr, flush=True)
            del step
            gc.collect()
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _memory_child(model_name: str, batch: int, method: str) -> dict:
    import torch
    from common import METHODS, make

    torch.set_num_threads(1)
    loss_fn = torch.nn.CrossEntropyLoss()
    model, X, Y = make(model_name, batch)
    try:
        step = METHODS[method](model, X, Y, loss_fn)
        step()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kb("VmRSS")
    step()
    peak = _rss_kb("VmHWM")
    return {"extra_mb": (peak - before) / 1024, "rss_mb": peak / 1024}


# --- driver ------------------------------------------------------------------------------------
def _run_child(args: list[str], env_extra: dict | None = None, timeout: float = 3600) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _dt(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


TARGETS = [  # (what, model, batch, method, target ratio) — issue 7, requirement 3 (1 thread, batch 256)
    ("CNN, full statistics with signs", "cnn", 256, "gsnr-diag", 1.8),
    ("MLP, full statistics with signs", "mlp", 256, "gsnr-diag", 2.2),
    ("MLP, signs=False", "mlp", 256, "gsnr-diag signs=False", 1.5),
    ("sequence model", "sequence", 256, "gsnr-diag", 5.0),
    ("transformer encoder layer", "transformer", 256, "gsnr-diag", 5.0),
]


def _targets(timing: dict, memory: dict, flat: dict) -> list[str]:
    res = timing.get(1, {})
    L = [
        "\n## Targets of issue 7 (1 thread, batch 256)\n",
        "| target | measured (wall) | measured (CPU time) | verdict |",
        "|---|---|---|---|",
    ]
    for what, model, batch, method, target in TARGETS:
        e = res.get(f"{model}|{batch}|{method}", {})
        if "wall" not in e:
            L.append(f"| {what} ≤ {target}× | n/a | n/a | not measured |")
            continue
        verdict = "met" if e["wall"] <= target else f"missed by {e['wall'] / target - 1:.0%}"
        L.append(f"| {what} ≤ {target}× | {e['wall']:.2f}× | {e['cpu']:.2f}× | {verdict} |")
    p = memory.get("mlp|256|plain", {})
    for method in ("gsnr-diag", "gsnr-diag gradient_stats()"):
        g = memory.get(f"mlp|256|{method}", {})
        if "extra_mb" in p and "extra_mb" in g:
            ratio = g["extra_mb"] / max(p["extra_mb"], 1e-9)
            L.append(
                f"| MLP extra memory ≤ 2× plain ({method}) | {g['extra_mb']:.1f} MB vs {p['extra_mb']:.1f} MB "
                f"= {ratio:.1f}× | | {'met' if ratio <= 2 else f'missed by {ratio / 2 - 1:.0%}'} |"
            )
    rows = flat.get("rows", [])
    for model in ("cnn", "mlp"):
        r = [x for x in rows if x["model"] == model]
        if len(r) == 2:
            a, b = sorted(r, key=lambda x: x["batches"])
            same = abs(b["peak_rss_mb"] - a["peak_rss_mb"]) <= max(2.0, 0.02 * a["peak_rss_mb"])
            L.append(
                f"| peak memory unchanged over 10× the data ({model}) | {a['peak_rss_mb']:.1f} → "
                f"{b['peak_rss_mb']:.1f} MB | | {'met' if same else 'missed'} |"
            )
    return L


def _fmt(entry: dict | None, field: str = "wall") -> str:
    if entry is None:
        return "–"
    if "error" in entry:
        return "n/a"
    v = entry[field]
    return f"{v:.2f}×" if v < 100 else f"{v:.0f}×"


def _errors(results: dict) -> list[str]:
    seen: dict = {}
    for key, e in results.items():
        if "error" in e:
            model, batch, method = key.split("|")
            where = seen.setdefault(e["error"], {})
            where.setdefault(f"{model} B={batch}", []).append(method)
    lines = []
    for err, where in seen.items():
        places = "; ".join(f"{', '.join(dict.fromkeys(ms))} on {mb}" for mb, ms in where.items())
        lines.append(f"- {places}: `{err}`")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions; a smoke run")
    ap.add_argument("--out", default=None, help="default RESULTS.md (RESULTS_per_chunk.md with --per-chunk)")
    ap.add_argument("--per-chunk", action="store_true", help="the per-chunk protocol: more methods, memory")
    ap.add_argument("--device", default="cpu", help="cpu (CPU time, 1 thread) or cuda (wall clock)")
    ap.add_argument("--models", default=None, help="comma-separated subset of the end-to-end models")
    ap.add_argument("--render", metavar="JSON", help="only re-render RESULTS.md from a saved results JSON")
    ap.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=4.0, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.per_chunk and not a.child:
        from e2e_run import main_e2e

        main_e2e(a)
        return
    a.out = a.out or os.path.join(HERE, "RESULTS_per_chunk.md")
    if a.child == "time":
        print(json.dumps(_time_child(a.threads, a.budget, CONFIGS[2:3] if a.quick else CONFIGS)))
        return
    if a.child == "memory":
        print(json.dumps(_memory_child(a.model, a.batch, a.method)))
        return

    import torch

    if a.render:
        with open(a.render) as fh:
            saved = json.load(fh)
        timing = {int(k): v for k, v in saved["timing"].items()}
        meta = saved["meta"]
        with open(a.out, "w") as f:
            f.write(
                _render(
                    timing,
                    saved["memory"],
                    saved["flat"],
                    _dt(meta["started"]),
                    _dt(meta["finished"]),
                    meta["load_before"],
                    meta["load_after"],
                    meta["quick"],
                    meta["torch"],
                    meta["opacus"],
                )
            )
        print(f"wrote {a.out}", file=sys.stderr)
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    budget = 0.3 if a.quick else 2.5
    timing = {}
    for threads in (1, 2):
        print(f"timing, {threads} thread(s) ...", file=sys.stderr, flush=True)
        timing[threads] = _run_child(
            ["--child", "time", "--threads", str(threads), "--budget", str(budget)] + (["--quick"] if a.quick else [])
        )
    memory = {}
    for model_name, batch in MEMORY_CONFIGS[1:2] if a.quick else MEMORY_CONFIGS:
        for method in MEMORY_METHODS:
            if (method == "loop" and a.quick) or (
                (model_name, batch) in SKIP_PER_SAMPLE and method in PER_SAMPLE_METHODS
            ):
                continue
            key = f"{model_name}|{batch}|{method}"
            memory[key] = _run_child(
                ["--child", "memory", "--model", model_name, "--batch", str(batch), "--method", method], MALLOC_ENV
            )
            print(key, memory[key], file=sys.stderr, flush=True)
    print("memory over 1x and 10x the data ...", file=sys.stderr, flush=True)
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "memory_flat.py"), "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, **MALLOC_ENV),
    )
    flat = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
    finished = datetime.datetime.now(datetime.timezone.utc)
    load_after = os.getloadavg()
    import opacus

    raw = os.path.splitext(a.out)[0] + ".json"  # RESULTS_per_chunk.json
    with open(raw, "w") as f:
        json.dump(
            {
                "timing": timing,
                "memory": memory,
                "flat": flat,
                "meta": {
                    "started": started.isoformat(),
                    "finished": finished.isoformat(),
                    "load_before": load_before,
                    "load_after": load_after,
                    "quick": a.quick,
                    "torch": torch.__version__,
                    "opacus": opacus.__version__,
                },
            },
            f,
            indent=1,
        )
    with open(a.out, "w") as f:
        f.write(
            _render(
                timing,
                memory,
                flat,
                started,
                finished,
                load_before,
                load_after,
                a.quick,
                torch.__version__,
                opacus.__version__,
            )
        )
    print(f"wrote {a.out}", file=sys.stderr)


METHOD_ORDER = [
    "gsnr-diag",
    "gsnr-diag signs=False",
    "gsnr-diag one batch",
    "gsnr-diag gradient_stats()",
    "opacus",
    "torch.func",
    "backpack BatchGrad",
    "backpack SumGradSquared (no signs)",
    "loop",
]


def _render(timing, memory, flat, started, finished, load_before, load_after, quick, torch_v, opacus_v) -> str:
    try:
        from importlib.metadata import version

        import backpack  # noqa: F401

        bp = f"backpack-for-pytorch {version('backpack-for-pytorch')}"
    except Exception:
        bp = "BackPACK not installed"
    from common import cpu_name

    cpu = cpu_name()
    L = []
    L.append("# gsnr-diag benchmarks\n")
    L.append(
        "Regenerate with (from the repository root; about 20 minutes on 2 cores; raw numbers go to "
        "`benchmarks/RESULTS.json`):\n"
    )
    L.append("```\npython benchmarks/run.py --per-chunk\n```\n")
    L.append(
        f"{'**QUICK SMOKE RUN — numbers not for quoting.** ' if quick else ''}"
        f"Run {started:%Y-%m-%d %H:%M}–{finished:%H:%M} UTC on {platform.node() or '?'}: {os.cpu_count()} CPUs "
        f"({cpu}), Python {platform.python_version()}, torch {torch_v}, opacus {opacus_v}, {bp}. "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (the machine was shared with "
        "other jobs, so absolute times are noisy; only interleaved ratios are quoted).\n"
    )
    L.append("""
**What each method does on one batch**: per-sample gradients reduced to Σg, Σg² (float64) and per-element
positive/negative sign counts, except where it says *no signs*.

- `gsnr-diag`: one chunk of `GradientCapture.measure_chunk` merged into running float64 accumulators — the
  per-batch cost inside a `gradient_stats()` call over many batches (the steady state).
- `gsnr-diag one batch`: the same with new accumulators every step (a call on a single batch).
- `gsnr-diag gradient_stats()`: the public call end to end on one batch — adds data handling, state
  restoration and building `GradientStats` (quantiles over all elements), a once-per-call cost.
- `opacus`: `GradSampleModule` hooks (`loss_reduction="mean"`), `loss.backward()`, then the common reduction of
  `p.grad_sample` (Σg, Σg², signs, float64).
- `torch.func`: `vmap(grad(f))` over the samples + the same reduction.
- `backpack BatchGrad`: BackPACK per-sample gradients + the same reduction; `backpack SumGradSquared`: Σg² and
  Σg only (no sign counts) — compare it with `gsnr-diag signs=False`.
- `loop`: batch-of-one forward/backward, accumulating the same sums.

**Models** (`benchmarks/common.py`): `cnn` — the paper's MNIST CNN (Table 2, p = 16): conv 5×5 (16 ch, pad 2),
ReLU, max-pool 2, conv 5×5 (16 ch), ReLU, max-pool 2, FC 784→10, input 1×28×28; `mlp` — 784-512-512-10 ReLU;
`sequence` — Embedding(5000, 64, padding_idx=0) + per-token Linear(64→128) + ReLU + mean pooling + FC, 32 tokens
with padding; `transformer` — one `nn.TransformerEncoderLayer(64, 4 heads, ff 128, no dropout)` + mean pooling +
FC on 32×64 inputs. Synthetic data (standard normal inputs, random labels), float32, eval mode.
""")
    for threads in (1, 2):
        res = timing.get(threads, {})
        if "error" in res:
            L.append(f"\n## Speed, {threads} thread(s): failed: `{res['error']}`\n")
            continue
        L.append(
            f"\n## Speed, {threads} thread{'s' if threads > 1 else ''}: median time ratio to a plain "
            "forward+backward (wall clock)\n"
        )
        cols = [f"{m} B={b}" for m, b in CONFIGS]
        L.append("| method | " + " | ".join(cols) + " |")
        L.append("|---" * (len(cols) + 1) + "|")
        L.append(
            "| plain forward+backward (ms) | "
            + " | ".join(
                next(
                    (f"{v['plain_ms']:.1f}" for k, v in res.items() if k.startswith(f"{m}|{b}|") and "plain_ms" in v),
                    "–",
                )
                for m, b in CONFIGS
            )
            + " |"
        )
        for method in METHOD_ORDER:
            L.append(f"| {method} | " + " | ".join(_fmt(res.get(f"{m}|{b}|{method}")) for m, b in CONFIGS) + " |")
        if threads == 1:
            L.append(
                "\nThe same, thread CPU time instead of wall clock (1 thread; insensitive to time spent "
                "descheduled on the shared machine):\n"
            )
            L.append("| method | " + " | ".join(cols) + " |")
            L.append("|---" * (len(cols) + 1) + "|")
            for method in METHOD_ORDER[:4]:
                L.append(
                    f"| {method} | " + " | ".join(_fmt(res.get(f"{m}|{b}|{method}"), "cpu") for m, b in CONFIGS) + " |"
                )
        errs = _errors(res)
        if errs:
            L.append("\nn/a — the method cannot run that model:\n")
            L.extend(errs)
    paths = {}
    for k, v in timing.get(1, {}).items():
        if k.endswith("|gsnr-diag") and v.get("paths"):
            paths.setdefault(k.split("|")[0], v["paths"])
    if paths:
        L.append(
            "\ngsnr-diag capture path per module: "
            + "; ".join(f"{m}: " + ", ".join(f"`{mod}` {p}" for mod, p in ps.items()) for m, ps in paths.items())
            + "\n"
        )
    L.append(
        "\n## Extra memory (MB): peak RSS of one step over the RSS before it, own subprocess per method, 1 thread\n"
    )
    L.append(
        "Measured with `MALLOC_MMAP_THRESHOLD_=65536` so that freed blocks return to the OS and the RSS "
        "before a step is not inflated by the warm-up step. For `gsnr-diag` (steady state) the float64 "
        "accumulators and work buffers already exist (allocated in the warm-up step); `gradient_stats()` "
        "includes everything a call allocates: accumulators (4 float64 tensors per parameter) and the "
        "`GradientStats` result.\n"
    )
    cols = [f"{m} B={b}" for m, b in MEMORY_CONFIGS]
    L.append("| method | " + " | ".join(cols) + " |")
    L.append("|---" * (len(cols) + 1) + "|")
    for method in MEMORY_METHODS:
        cells = []
        for m, b in MEMORY_CONFIGS:
            e = memory.get(f"{m}|{b}|{method}")
            cells.append("–" if e is None else ("n/a" if "error" in e else f"{e['extra_mb']:.1f}"))
        L.append(f"| {method} | " + " | ".join(cells) + " |")
    L.append("\n## Peak memory over 1× and 10× the data (`python benchmarks/memory_flat.py`)\n")
    if "error" in flat:
        L.append(f"failed: `{flat['error']}`\n")
    else:
        L.append(flat["table"] + "\n")
    L.extend(_targets(timing, memory, flat))
    if os.path.exists(os.path.join(HERE, "NOTES_per_chunk.md")):
        with open(os.path.join(HERE, "NOTES_per_chunk.md")) as fh:
            L.append("\n" + fh.read())
    L.append(
        "\n## GPU\n\nGPU figures are pending: no GPU was available to this run. The code keeps every "
        "accumulator and work buffer on the model's device (no CPU is hard-coded); `torch._int_mm` for the "
        "sign counts falls back to float32 products where the device or shape does not support it.\n"
    )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
