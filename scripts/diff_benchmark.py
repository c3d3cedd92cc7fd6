"""Ground-truth benchmark of model-diffing methods on the two SmolLM2 organisms (BENCHMARKS.md).

For each organism and evaluation text, every method's top 20 results are scored by
* ctx@20: the fraction located in the fine-tuning objective's text (a pytest-docs document, or
  an inserted password sentence);
* tok@20: the fraction whose token is a target token (domain tokens: at least 20x more frequent
  in the pytest docs than in Shakespeare, seen 10+ times; password: ' password', ' lighthouse'
  and the answer's pieces).

Usage: nice -n 10 python scripts/diff_benchmark.py [--n-tokens 2048] [--out outputs/diff-benchmark]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import concatenate_datasets

from sae_lens_itda.analysis.diff_baselines import activation_difference_lens, sae_latent_diff
from sae_lens_itda.analysis.diff_report import write_report
from sae_lens_itda.analysis.diffing import diff_models
from sae_lens_itda.core.construction import ConstructionSettings
from sae_lens_itda.sources.corpora import load_documents
from sae_lens_itda.sources.models import load_model
from sae_lens_itda.sources.organisms import FACT_ANSWER, domain_documents, fact_documents, load_organism, organism_info

HOOK = "blocks.27.hook_resid_post"
LAYERS = [25, 26, 27, 28, 29]
N = 20


def domain_tokens(tok) -> set[int]:
    def counts(docs):
        c = Counter()
        for t in docs["text"]:
            c.update(tok(t, add_special_tokens=False)["input_ids"])
        return c, sum(c.values())

    d, nd = counts(domain_documents("train"))
    s, ns = counts(load_documents("shakespeare", "train"))
    return {t for t, n in d.items() if n >= 10 and (n / nd) >= 20 * ((s.get(t, 0) + 1) / ns)}


def _locs(r, rows):
    w = r.windows
    return [(w.doc_ids[int(r.token_rows[i, 0])], tuple(w.char_spans[int(r.token_rows[i, 0]), int(r.token_rows[i, 1])].tolist()),
             int(w.input_ids[int(r.token_rows[i, 0]), int(r.token_rows[i, 1])])) for i in rows]


def method_items(r, base_model, ft_model) -> dict[str, list]:
    """Each method's top-N items as (doc_id, char_span, token_id); ADL as (None, None, token_id)."""
    t0 = time.perf_counter()
    items = {name: _locs(r, np.argsort(-s, kind="stable")[:N]) for name, s in
             [("ITDA token excess error", r.token_scores["itda_excess_error"]), ("raw diff norm", r.token_scores["diff_norm"])]}
    for key, name in [("novelty", "ITDA novel atoms"), ("activation_change", "ITDA activation change")]:
        items[name] = [(a.label.doc_id, a.label.char_span, a.label.token_id) for a in r.atoms[key][:N]]
    xa, xb = r.acts
    t0 = time.perf_counter()
    sae = sae_latent_diff(xa, xb)
    items["TopK SAE latent diff"] = _locs(r, sae["top_row"][sae["order"][:N]])
    first = r.token_rows[:, 1] <= 5  # the first tokens of each window (position 0 is never kept)
    adl = activation_difference_lens(ft_model, (xb[first] - xa[first]).mean(0), N)
    items["activation-difference lens"] = [(None, None, t) for t, _, _ in adl]
    return items, {"sae_s": time.perf_counter() - t0, "adl_tokens": [s for _, s, _ in adl]}


def score(items, in_target, targets) -> dict[str, dict]:
    out = {}
    for name, its in items.items():
        ctx = [in_target(d, s) for d, s, _ in its if d is not None]
        out[name] = {"ctx@20": float(np.mean(ctx)) if ctx and any(d is not None for d, _, _ in its) else None,
                     "tok@20": float(np.mean([t in targets for _, _, t in its])) if its else 0.0, "n": len(its)}
    return out


def run_case(base, ft, docs, in_target, targets, out: Path, args) -> dict:
    t0 = time.perf_counter()
    settings = ConstructionSettings(k=16, loss_threshold=args.loss_threshold)
    r = diff_models(base, ft, HOOK, dataset=docs, n_tokens=args.n_tokens, context_size=64, settings=settings, layers=LAYERS)
    itda_s = time.perf_counter() - t0
    write_report(r, out, top=20)
    items, extra = method_items(r, base, ft)
    res = {"scores": score(items, in_target, targets), "jaccard": r.jaccard, "itda_s": itda_s, **extra, "meta": r.meta,
           "n_target_tokens_in_text": int(sum(in_target(*loc[:2]) for loc in _locs(r, range(len(r.token_rows)))))}
    print(out.name, json.dumps(res["scores"]), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--loss-threshold", type=float, default=4e-4)
    p.add_argument("--out", default="outputs/diff-benchmark")
    p.add_argument("--organisms", nargs="*", default=["pytest-docs", "password"])
    args = p.parse_args()
    out = Path(args.out)
    base = load_model("smollm2-135m")
    shakespeare = load_documents("shakespeare", "test")
    results = {}
    if "pytest-docs" in args.organisms:
        docs_cases(base, shakespeare, out, args, results)
    if "password" in args.organisms:
        password_cases(base, shakespeare, out, args, results)
    out.mkdir(parents=True, exist_ok=True)
    name = "benchmark-" + "-".join(args.organisms) + ".json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


def docs_cases(base, shakespeare, out, args, results) -> None:
    tok = base.tokenizer
    ft = load_organism("smollm2-pytest-docs")
    dom = domain_tokens(tok)
    in_dom = lambda d, s: d is not None and d.startswith("pytest:")  # noqa: E731
    mix = concatenate_datasets([domain_documents("test"), shakespeare])
    results["pytest-docs / docs+Shakespeare"] = run_case(base, ft, mix, in_dom, dom, out / "pytest-docs-mix", args)
    results["pytest-docs / Shakespeare"] = run_case(base, ft, shakespeare, in_dom, dom, out / "pytest-docs-shakespeare", args)
    results["pytest-docs"] = {"info": {k: v for k, v in organism_info("smollm2-pytest-docs").items() if k != "loss_curve"},
                              "n_domain_tokens": len(dom)}


def password_cases(base, shakespeare, out, args, results) -> None:
    tok = base.tokenizer
    ft = load_organism("smollm2-password")
    targets = {i for w in (" password", " lighthouse", FACT_ANSWER) for i in tok(w, add_special_tokens=False)["input_ids"]}
    docs, spans = fact_documents("test", every=2000, prefix="fact:")
    in_fact = lambda d, s: d in spans and s is not None and any(a < s[1] and s[0] < b for a, b in spans[d])  # noqa: E731
    results["password / Shakespeare+facts"] = run_case(base, ft, docs, in_fact, targets, out / "password-facts", args)
    results["password / Shakespeare"] = run_case(base, ft, shakespeare, in_fact, targets, out / "password-shakespeare", args)
    results["password"] = {"info": {k: v for k, v in organism_info("smollm2-password").items() if k != "loss_curve"}}


def table(paths: list[str]) -> str:
    """The BENCHMARKS.md table from benchmark-*.json files."""
    res = {}
    for path in paths:
        res.update(json.loads(Path(path).read_text()))
    cases = [k for k in res if "/" in k]
    methods = list(res[cases[0]]["scores"])
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| method | " + " | ".join(f"{c} ctx@20 / tok@20" for c in cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{fmt(res[c]['scores'][m]['ctx@20'])} / {fmt(res[c]['scores'][m]['tok@20'])}" for c in cases) + " |")
    lines.append("| (share of target tokens in the text) | " + " | ".join(
        f"{res[c]['n_target_tokens_in_text'] / res[c]['meta']['n_tokens']:.3f}" for c in cases) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
    else:
        main()
