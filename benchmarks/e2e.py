"""End-to-end benchmark: gradient_stats over 1,024 samples in chunks of 256 against Opacus and torch.func.

Every method does the same job on the same data: per-sample gradients of every parameter reduced to
float64 Σg, Σg² and per-element sign counts, accumulated over the four chunks. The ratio is to a
plain forward+backward over the same four chunks, interleaved (plain, method, plain), CPU time of
the process (``time.process_time``; on CUDA: wall clock after synchronizing), 1 thread, median over
repeats. Used by ``benchmarks/run.py``; not part of the test suite.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import torch
from torch import nn

N_SAMPLES = 1024
CHUNK = 256
SEQ = 32
CLASSES = 10

MODELS = ["mlp", "cnn", "emb_transformer", "encoder_padding", "gpt2", "bert"]
METHODS = ["gsnr-diag", "opacus", "torch.func"]
LABELS = {
    "mlp": "MLP 784-512-512-10",
    "cnn": "paper CNN",
    "emb_transformer": "Embedding + nn.TransformerEncoderLayer (d 64, 4 heads, T 32)",
    "encoder_padding": "nn.TransformerEncoder, 2 layers, padding mask (d 64, 4 heads, T 32)",
    "gpt2": "transformers GPT-2 LM head, tied (2 layers, d 64, T 32, vocab 500)",
    "bert": "transformers BERT classifier (2 layers, d 64, T 32, vocab 500)",
}
TRANSFORMERS = {"emb_transformer", "encoder_padding", "gpt2", "bert"}


# --- models -------------------------------------------------------------------------------------
class EmbTransformer(nn.Module):
    def __init__(self, vocab=1000, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, CLASSES)

    def forward(self, tokens):
        return self.out(self.enc(self.emb(tokens)).mean(1))


class PaddedEncoder(nn.Module):
    def __init__(self, vocab=1000, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.out = nn.Linear(dim, CLASSES)

    def forward(self, tokens, pad):
        h = self.enc(self.emb(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))


def _lm_loss(out, y):
    logits = out.logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _logits_loss(out, y):
    return nn.functional.cross_entropy(out.logits, y)


def build(name: str, seed: int = 0):
    """``(model, X, Y, loss_fn)``: float32, eval mode, synthetic data of 1,024 samples."""
    from common import mlp, paper_cnn

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    Y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)
    loss = nn.CrossEntropyLoss()
    if name == "mlp":
        return mlp().eval(), torch.randn(N_SAMPLES, 784, generator=g), Y, loss
    if name == "cnn":
        return paper_cnn().eval(), torch.randn(N_SAMPLES, 1, 28, 28, generator=g), Y, loss
    if name == "emb_transformer":
        return EmbTransformer().eval(), torch.randint(0, 1000, (N_SAMPLES, SEQ), generator=g), Y, loss
    if name == "encoder_padding":
        tokens = torch.randint(1, 1000, (N_SAMPLES, SEQ), generator=g)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (N_SAMPLES,), generator=g)
        pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
        tokens[pad] = 0
        return PaddedEncoder().eval(), {"tokens": tokens, "pad": pad}, Y, loss
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        )
        X = torch.randint(0, 500, (N_SAMPLES, SEQ), generator=g)
        return (
            transformers.GPT2LMHeadModel(cfg).eval(),
            X,
            torch.randint(0, 500, (N_SAMPLES, SEQ), generator=g),
            _lm_loss,
        )
    if name == "bert":
        cfg = transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            vocab_size=500,
            max_position_embeddings=64,
            num_labels=CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        X = torch.randint(0, 500, (N_SAMPLES, SEQ), generator=g)
        return transformers.BertForSequenceClassification(cfg).eval(), X, Y, _logits_loss
    raise ValueError(name)


# --- helpers ------------------------------------------------------------------------------------
def _tmap(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _tmap(fn, v) for k, v in x.items()}
    return type(x)(_tmap(fn, v) for v in x)


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _chunks(X, Y):
    for s in range(0, int(Y.shape[0]), CHUNK):
        yield _tmap(lambda t: t[s : s + CHUNK], X), Y[s : s + CHUNK]


class _Sums:
    """float64 Σg, Σg² and sign counts of per-sample gradients, accumulated over chunks."""

    def __init__(self):
        self.acc: dict = {}

    def add(self, k, g):
        g64 = g.detach().to(torch.float64)
        parts = [g64.sum(0), g64.square().sum(0), (g > 0).sum(0), (g < 0).sum(0)]
        if k in self.acc:
            for a, b in zip(self.acc[k], parts):
                a.add_(b)
        else:
            self.acc[k] = parts


# --- methods: each returns step() doing the whole 1,024-sample job --------------------------------
def method_plain(model, X, Y, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for x, y in _chunks(X, Y):
            torch.autograd.grad(loss_fn(_call(model, x), y), params)

    return step


def method_gsnr(model, X, Y, loss_fn):
    from gsnr_diag import gradient_stats

    def step():
        step.stats = gradient_stats(model, (X, Y), loss_fn, batch_size=CHUNK)

    return step


def method_opacus(model, X, Y, loss_fn):
    from opacus import GradSampleModule

    m = copy.deepcopy(model).train()  # Opacus' hooks capture only in train mode (every dropout here is 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(m, loss_reduction="mean")
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]

    def step():
        sums = _Sums()
        for x, y in _chunks(X, Y):
            loss_fn(_call(gsm, x), y).backward()
            for k, p in named:
                sums.add(k, p.grad_sample)
                p.grad_sample = None
                p.grad = None

    return step


def method_functorch(model, X, Y, loss_fn):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        xb = _tmap(lambda t: t.unsqueeze(0), x)
        args, kwargs = ((), xb) if isinstance(xb, dict) else ((xb,), {})
        return loss_fn(functional_call(model, (p, buffers), args, kwargs), y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        sums = _Sums()
        for x, y in _chunks(X, Y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for k, g in per_sample(params, x, y).items():
                    sums.add(k, g)

    return step


FACTORIES = {"plain": method_plain, "gsnr-diag": method_gsnr, "opacus": method_opacus, "torch.func": method_functorch}


# --- timing -------------------------------------------------------------------------------------
def _clock(device: str):
    if device.startswith("cuda"):

        def now():
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.process_time


def overheads(model, X, Y, loss_fn, now) -> dict:
    """CPU time of the once-per-call parts of gradient_stats: the layout probes, building GradientStats, and
    (not part of the call: on first read) deriving its aggregates."""
    from gsnr_diag.capture import GradientCapture
    from gsnr_diag.core.moments import Moments
    from gsnr_diag.core.stats import stats_from_moments

    probe, build, derive = [], [], []
    for _ in range(3):
        moments = Moments()
        with torch.enable_grad(), GradientCapture(model, loss_fn) as cap:
            x0, y0 = next(_chunks(X, Y))
            t0 = now()
            cap._probe_layout(x0, y0)
            cap._probe_broadcast(x0, y0)
            probe.append(now() - t0)
            for x, y in _chunks(X, Y):
                cap.measure_chunk(x, y, moments)
        weights = {k: p.detach() for k, p in cap.params.items()}
        t0 = now()
        stats = stats_from_moments(moments, weights, capture_paths=dict(cap.paths))
        t1 = now()
        stats.aggregates()  # the derived fields, formed on first read
        build.append(t1 - t0)
        derive.append(now() - t1)
    return {
        "probe_s": statistics.median(probe),
        "stats_s": statistics.median(build),
        "derive_s": statistics.median(derive),
    }


def time_models(models, device: str, budget_s: float, log=sys.stderr) -> dict:
    """{model: {method: {...}}} for the given models (1 thread)."""
    torch.set_num_threads(1)
    now = _clock(device)
    out: dict = {}
    for name in models:
        res = out[name] = {}
        try:
            model, X, Y, loss_fn = build(name)
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        model, X, Y = model.to(device), _tmap(lambda t: t.to(device), X), Y.to(device)
        plain = method_plain(model, X, Y, loss_fn)
        for _ in range(2):
            plain()
        steps = {}
        for method in METHODS:
            try:
                steps[method] = FACTORIES[method](model, X, Y, loss_fn)
                t0 = now()
                steps[method]()  # warm-up
                res[method] = {"first_s": now() - t0, "ratios": [], "plain_s": [], "method_s": []}
            except Exception as exc:
                res[method] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
                steps.pop(method, None)
            print(name, method, res[method].get("error", "ok"), file=log, flush=True)
        # interleaved repeats: round-robin over methods, each as (plain, method, plain)
        live = list(steps)
        reps = {m: int(max(3, min(9, budget_s / max(res[m]["first_s"], 1e-3)))) for m in live}
        for r in range(max(reps.values(), default=0)):
            for m in live:
                if r >= reps[m]:
                    continue
                t0 = now()
                plain()
                t1 = now()
                steps[m]()
                t2 = now()
                plain()
                t3 = now()
                p = (t1 - t0 + t3 - t2) / 2
                res[m]["ratios"].append((t2 - t1) / max(p, 1e-9))
                res[m]["plain_s"].append(p)
                res[m]["method_s"].append(t2 - t1)
        for m in live:
            e = res[m]
            e["ratio"] = statistics.median(e["ratios"])
            e["plain_median_s"] = statistics.median(e["plain_s"])
            e["method_median_s"] = statistics.median(e["method_s"])
            print(name, m, f"{e['ratio']:.2f}x", file=log, flush=True)
        if "gsnr-diag" in steps:
            res["paths"] = dict(steps["gsnr-diag"].stats.capture_paths)
            res["overheads"] = overheads(model, X, Y, loss_fn, now)
        del steps, plain, model
    return out
