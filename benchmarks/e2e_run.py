"""Driver of the end-to-end benchmark for benchmarks/run.py: run (CPU or CUDA), save JSON, render RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _meta(device: str, started, quick: bool) -> dict:
    import opacus
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "not installed"
    from common import cpu_name

    cpu = cpu_name()
    if device.startswith("cuda"):
        cpu = torch.cuda.get_device_name()
    return {
        "started": started.isoformat(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "load": os.getloadavg(),
        "device": device,
        "hardware": cpu,
        "cpus": os.cpu_count(),
        "node": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "transformers": tv,
        "quick": quick,
    }


def main_e2e(a) -> None:
    import e2e

    cuda = a.device.startswith("cuda")
    raw = os.path.join(HERE, "RESULTS_cuda.json" if cuda else "RESULTS.json")
    out = a.out or os.path.join(HERE, "RESULTS.md")
    if a.render:
        render_file(a.render, out)
        return
    if a.quick:
        e2e.N_SAMPLES = 256
    models = a.models.split(",") if a.models else e2e.MODELS
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    results = e2e.time_models(models, a.device, 1.0 if a.quick else 12.0)
    meta = _meta(a.device, started, a.quick)
    meta["load_before"] = load_before
    tmp = raw + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results, "meta": meta}, f, indent=1)
    os.replace(tmp, raw)
    render_file(os.path.join(HERE, "RESULTS.json"), out)
    print(f"wrote {raw} and {out}", file=sys.stderr)


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def render_file(json_path: str, out: str) -> None:
    cpu = _load(json_path)
    gpu = _load(os.path.join(os.path.dirname(json_path), "RESULTS_cuda.json"))
    text = render(cpu, gpu)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)


def _run_line(m: dict) -> str:
    return (
        f"{'**QUICK SMOKE RUN — numbers not for quoting.** ' if m.get('quick') else ''}"
        f"Run {m['started'][:16].replace('T', ' ')}–{m['finished'][11:16]} UTC on {m['node'] or '?'} "
        f"({m['device']}: {m['hardware']}, {m['cpus']} CPUs), Python {m['python']}, torch {m['torch']}, "
        f"opacus {m['opacus']}, transformers {m['transformers']}. Load average before/after: "
        f"{m['load_before'][0]:.1f} / {m['load'][0]:.1f}.\n"
    )


PROTOCOL = """
**Protocol** (`benchmarks/e2e.py`): each column does the whole job on 1,024 synthetic samples in chunks of 256 —
per-sample gradients of every parameter reduced to float64 Σg, Σg² and per-element positive/negative sign counts,
accumulated over the chunks. `gsnr-diag` is the public `gradient_stats(model, (X, Y), loss_fn, batch_size=256)`
end to end (data handling, layout probes, four chunks, building `GradientStats`); `Opacus hooks` is
`GradSampleModule(loss_reduction="mean")` + `backward()` + the reduction of `p.grad_sample`; `torch.func vmap` is
`vmap(grad(loss of one sample))` + the same reduction. Ratio: the method's time over a plain forward+backward over
the same four chunks, interleaved (plain, method, plain), median over 3–9 repeats; 1 thread, CPU time of the process
(`time.process_time`: insensitive to time spent descheduled on the shared 2-core machine). Models: float32, eval mode,
every dropout 0; transformers' models from tiny configs (no download). GPT-2: LM loss over all 32 tokens, head tied
to the token embedding.
"""


def render(cpu: dict | None, gpu: dict | None) -> str:
    from e2e_report import paths, table, targets

    L = ["# gsnr-diag benchmarks: `gradient_stats` end to end\n"]
    L.append("Regenerate (from the repository root; raw numbers go to `benchmarks/RESULTS.json`):\n")
    L.append(
        "```\npython benchmarks/run.py                # CPU, 1 thread\n"
        "python benchmarks/run.py --device cuda  # GPU\n```\n"
    )
    if cpu is None:
        L.append("No CPU results saved yet.\n")
    else:
        L.append(_run_line(cpu["meta"]))
        L.append(PROTOCOL)
        L.append("\n## Time ratio to a plain forward+backward (CPU time, 1 thread, 1,024 samples in chunks of 256)\n")
        L += table(cpu["results"])
        L.append("\n## Targets\n")
        L += targets(cpu["results"])
        L.append("\n## gsnr-diag capture paths (module → path, last chunk)\n")
        L += paths(cpu["results"])
    L.append("\n## CUDA\n")
    if gpu is None:
        L.append(
            "Pending: no GPU was lent to this run. The code paths are device-agnostic (every buffer on the model's "
            "device; the cache-sized column blocks of the reductions apply on CPU only); "
            "`python benchmarks/run.py --device cuda` runs the same models and columns on a GPU (wall clock after "
            "`torch.cuda.synchronize()`) and this file then shows its table.\n"
        )
    else:
        L.append(_run_line(gpu["meta"]))
        L += table(gpu["results"])
        L.append("")
        L += targets(gpu["results"])
    notes = os.path.join(HERE, "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as fh:
            L.append("\n" + fh.read())
    return "\n".join(L) + "\n"
