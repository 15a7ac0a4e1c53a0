"""Memory and time at LLaMA-7B size on one GPU, with random weights (nothing is downloaded),
beside what ``icl-probe plan`` predicts for the same work.

Run on a machine with a CUDA GPU: ``python benchmarks/bench_gpu_memory.py [--layers 32]
[--json out.json]``. ``--small`` runs the same steps on a 2-layer, 256-wide model (on the CPU
where no GPU is present): a smoke test of this script, not a measurement.

Steps, each from a clean peak counter (``torch.cuda.max_memory_allocated``: what the caching
allocator handed out, the figure ``plan`` models; the CUDA context, ~0.5 GB, comes on top):
bare forward; trace at the prediction position; all implied updates; one Dai fine-tune on kv;
one ``compare()`` unit of a Dai table (``--unit-k`` 8, ``--unit-queries`` 8, one seed, every
baseline: the two random-weight baseline models are built for it, one at a time); Shen et
al.'s whole-model GD (SGD on every parameter, full batch, 2 epochs, with a checkpoint of the
metrics after each).

The tokenizer: ``--tokenizer DIR`` (a saved Hugging Face tokenizer, e.g. SmolLM2's, 49,152
tokens against LLaMA's 32,000: 0.28 GB more of embeddings and unembedding); without it, the
byte tokenizer built in memory, which only tasks scored by whole answers (``capital``) can use,
so the compare() and Shen steps are skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import traceback
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import icl_probe as ip
from icl_probe.experiments.config import load_config
from icl_probe.experiments.plan import plan
from icl_probe.gd import EpochFineTune
from icl_probe.compare.shen import shen_curves
from icl_probe.models import byte_tokenizer
from icl_probe.hooks.selfcheck import stack_versions

GiB = 2**30

DAI = """[experiment]
name = "bench_dai_unit"
sections = ["icl_vs_gd"]
[icl_vs_gd]
tasks = ["sentiment"]
k = {k}
queries = {queries}
dev_queries = 1  # the minimum; one rate: compare() runs no dev split
seeds = [0]
lrs = [1e-3]
methods = ["dai"]
params = "kv"
baselines = ["shuffled_labels", "untrained", "embeddings_only"]
"""

SHEN = """[experiment]
name = "bench_shen_whole_model"
sections = ["shen"]
[shen]
tasks = ["sentiment"]
n_demos = [8]
queries = 8
seeds = [0]
eval_every = 1
order_methods = []
[[shen.methods]]
name = "gd_all"
params = "all"
epochs = 2
lrs = [1e-5]
"""


def build(args: argparse.Namespace, device: str) -> tuple[object, object, Path]:
    tok = (AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
           if args.tokenizer else byte_tokenizer())
    d, f, L, H = (256, 688, 2, 4) if args.small else (4096, 11008, args.layers, 32)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=f,
                      num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    where = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    cfg.save_pretrained(where)  # for plan(): the shape, counted on the meta device
    tok.save_pretrained(where)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model = ip.load_model(hf, tokenizer=tok, device=device, dtype="bf16")
    return model, tok, where


def planned(toml: str, where: Path, tmp: Path) -> dict:
    path = tmp / "plan.toml"
    path.write_text(toml)
    row = plan(load_config(path), model_name=str(where), dtype="bf16").models[0]
    return {k: row[k] for k in ("weights_gb", "finetune_gb", "traces_gb", "process_gb",
                                "finetune_note", "traces_note")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--unit-k", type=int, default=8, help="the compare() unit's k")
    ap.add_argument("--unit-queries", type=int, default=8, help="the compare() unit's queries")
    ap.add_argument("--small", action="store_true", help="a 2-layer smoke test of the script")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer directory")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only the steps whose name contains one of these words")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("needs a CUDA device (or --small for a smoke test on the CPU)")
    device = "cuda" if cuda else "cpu"
    model, _, where = build(args, device)
    weights = torch.cuda.memory_allocated() / GiB if cuda else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    pairs = [ip.build_prompt(model, "capital", query=q, k=args.k, seed=q)
             for q in range(args.prompts)]
    n_tok = sum(len(p.icl_ids) for p in pairs)
    out = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "stack": stack_versions(), "layers": model.cfg.n_layers, "n_params": n_params,
           "weights_gib": weights, "steps": {}}
    print(f"LLaMA-7B-shaped, {model.cfg.n_layers} layers, {n_params / 1e9:.2f} B parameters, "
          f"bf16 weights: {weights:.1f} GiB; {len(pairs)} prompts, {n_tok} tokens")
    tmp = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    dai = DAI.format(k=args.unit_k, queries=args.unit_queries)
    plans = {"compare() unit": planned(dai, where, tmp),
             "shen whole-model SGD": planned(SHEN, where, tmp)} if args.tokenizer else {}
    steps = [
        ("bare forward", True, lambda: model(torch.nn.utils.rnn.pad_sequence(
            [p.icl_ids for p in pairs], batch_first=True).to(device))),
        ("trace (all quantities at p)", True, lambda: ip.trace(model, pairs)),
        ("implied_updates", True, lambda: ip.implied_updates(model, pairs)),
        ("finetune dai kv", False, lambda: ip.finetune(model, pairs[0], lr=1e-3)),
        ("compare() unit", False, lambda: ip.compare(
            model, "sentiment", k=args.unit_k, queries=args.unit_queries, seeds=[0],
            gd=ip.FineTuneConfig(method="dai", params="kv", lr=1e-3), progress=False)),
        ("shen whole-model SGD", False, lambda: shen_curves(
            model, "sentiment", n_demos=8, methods=[EpochFineTune(params="all", epochs=2)],
            lrs=[1e-5], queries=8, eval_every=1)),
    ]
    steps = steps if args.tokenizer else steps[:4]
    if args.only:
        steps = [x for x in steps if any(w in x[0] for w in args.only)]
    for name, inference, fn in steps:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            with torch.inference_mode(inference):
                fn()
            err = None
        except Exception as e:  # reported beside the step; the next steps still run
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(traceback.format_exc(limit=-6), flush=True)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
        row = {"seconds": secs, "peak_gib": peak, "error": err, "plan": plans.get(name)}
        out["steps"][name] = row
        p = plans.get(name)
        vs = (f"; plan {p['process_gb'] * 1e9 / GiB:6.1f} GiB ({p['finetune_note']})"
              if p else "")
        print(f"{name:>28}: {secs:7.2f} s, peak {peak:6.1f} GiB{vs}"
              + (f"  [{err}]" if err else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
