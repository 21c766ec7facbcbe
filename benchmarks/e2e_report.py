"""Markdown for the end-to-end benchmark (benchmarks/e2e.py): the ratio table, the targets, the capture paths."""

from __future__ import annotations

from e2e import LABELS, METHODS, MODELS, TRANSFORMERS

COLUMNS = {"gsnr-diag": "gsnr-diag", "opacus": "Opacus hooks", "torch.func": "torch.func vmap"}


def _cell(e: dict | None) -> str:
    if not e:
        return "–"
    if "error" in e:
        return "n/a"
    r = e["ratio"]
    return f"{r:.2f}×" if r < 100 else f"{r:.0f}×"


def _ratio(res: dict, model: str, method: str):
    e = res.get(model, {}).get(method) or {}
    return e.get("ratio")


def table(res: dict) -> list[str]:
    L = [
        "| model | plain fwd+bwd, 4 chunks (s) | " + " | ".join(COLUMNS[m] for m in METHODS) + " |",
        "|---" * (len(METHODS) + 2) + "|",
    ]
    for m in MODELS:
        r = res.get(m, {})
        if "error" in r:
            L.append(f"| {LABELS[m]} | model not built: `{r['error']}` |" + " |" * len(METHODS))
            continue
        plain = next((r[x]["plain_median_s"] for x in METHODS if "plain_median_s" in r.get(x, {})), None)
        p = f"{plain:.3f}" if plain is not None else "–"
        L.append(f"| {LABELS[m]} | {p} | " + " | ".join(_cell(r.get(x)) for x in METHODS) + " |")
    errors = {}
    for m in MODELS:
        for x in METHODS:
            e = res.get(m, {}).get(x) or {}
            if "error" in e:
                errors.setdefault(e["error"], []).append(f"{COLUMNS[x]} on {m}")
    if errors:
        L.append("\nn/a — the method cannot run that model:\n")
        L += [f"- {', '.join(where)}: `{err}`" for err, where in errors.items()]
    return L


def targets(res: dict) -> list[str]:
    L = ["| target | measured | verdict |", "|---|---|---|"]

    def verdict(value, limit):
        if value is None:
            return "not measured"
        return "met" if value <= limit else f"missed by {value / limit - 1:.0%}"

    for m in MODELS:
        g, f = _ratio(res, m, "gsnr-diag"), _ratio(res, m, "torch.func")
        if m in TRANSFORMERS:
            L.append(f"| {m}: ≤ 2.5× plain | {g:.2f}× | {verdict(g, 2.5)} |" if g else f"| {m}: ≤ 2.5× | n/a | – |")
            if g and f:
                L.append(f"| {m}: ≤ 0.6× torch.func | {g / f:.2f}× torch.func | {verdict(g / f, 0.6)} |")
            elif g:
                L.append(f"| {m}: ≤ 0.6× torch.func | torch.func cannot run it | – |")
        if m == "mlp" and g:
            L.append(f"| mlp: ≤ 2.5× plain over 4 chunks | {g:.2f}× | {verdict(g, 2.5)} |")
            o = res[m].get("overheads")
            call = res[m]["gsnr-diag"]["method_median_s"]
            if o:
                share = (o["probe_s"] + o["stats_s"]) / call
                L.append(
                    f"| mlp: layout probe + building GradientStats ≤ 10% of the call | {o['probe_s'] * 1e3:.1f} ms + "
                    f"{o['stats_s'] * 1e3:.1f} ms = {share:.1%} of {call * 1e3:.0f} ms | {verdict(share, 0.10)} |"
                )
                if "derive_s" in o:
                    L.append(
                        f"| mlp: (not in the call) deriving the aggregates on first read | "
                        f"{o['derive_s'] * 1e3:.1f} ms = {o['derive_s'] / call:.1%} of the call | – |"
                    )
        if g and f:
            L.append(f"| {m}: not slower than torch.func | {g:.2f}× vs {f:.2f}× | {verdict(g, f)} |")
    return L


def paths(res: dict) -> list[str]:
    L = []
    for m in MODELS:
        p = res.get(m, {}).get("paths")
        if not p:
            continue
        kinds: dict[str, list[str]] = {}
        for mod, path in p.items():
            kinds.setdefault(path, []).append(mod)
        parts = [f"{k}: {len(v)} ({', '.join(f'`{x}`' for x in v)})" for k, v in kinds.items()]
        L.append(f"- **{m}** — " + "; ".join(parts))
    return L
