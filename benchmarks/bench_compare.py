"""Comparator benchmark: :func:`icl_probe.compare` (shared protocol, one seed, Dai-FT on kv, no
baseline runs) against the floor it cannot avoid, measured in the same run: one bare forward
of every ICL prompt and every ZS prompt, k forward + backward steps of the fine-tune (one per
demonstration, kv parameters), and one bare forward of every ZS prompt through the fine-tuned
model, each in right-padded batches (16 ICL prompts, 32 ZS prompts: the sizes ``compare``
uses). ``compare`` also computes every metric, the intervals and the tables; it runs the
demonstrations' shared prefix once, which the floor does not.

The **prefix floor** is what a careful plain script would do with the same reuse, written
with plain ``transformers`` (the embedded model's converted checkpoint, the library's default
attention): the demonstration prefix once on its KV cache; the suffixes batched on the repeated
cache, unembedding only each prompt's last position; the zero-shot prompts batched the same
way; k SGD steps on k_proj/v_proj (one per demonstration, Dai's loss tokens); the zero-shot
batch again through the fine-tuned weights; the weights restored. Before timing it checks that
its own ICL logits equal full-prompt forwards (in float64, to 1e-9 relative).

Run: ``python benchmarks/bench_compare.py [--queries 24 --k 16 --repeats 3]``. Medians over
interleaved repeats; the ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from transformers import AutoModelForCausalLM

import icl_probe as ip
from _timing import interleaved, ratio
from icl_probe.compare import demonstrations
from icl_probe.hooks.prefix import shared_prefix_length
from icl_probe.models.cache import embedded_gguf_path, gguf_cache_path
from icl_probe.gd import trainable_parameters
from icl_probe.gd.losses import _examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = ip.load_model(device="cpu")
    task = ip.load_task("sentiment")
    demos = demonstrations(task, args.k, 0)
    pairs = [ip.build_prompt(model, task, q, demos=demos)
             for q in task.split("test")[: args.queries]]
    kv = list(trainable_parameters(model, "kv").values())
    cfg = ip.FineTuneConfig(method="dai", params="kv", lr=1e-2)

    def batches(kind, size):
        """Right-padded batches of the prompts, as a plain script would run them."""
        ids = [p.ids(kind) for p in pairs]
        for i in range(0, len(ids), size):
            chunk = ids[i: i + size]
            out = torch.zeros(len(chunk), max(len(x) for x in chunk), dtype=torch.long)
            for r, x in enumerate(chunk):
                out[r, : len(x)] = x
            yield out

    def bare(**kw):
        for x in model.parameters():
            x.requires_grad_(False)
        with torch.inference_mode():
            for b in batches("icl", 16):  # full ICL prompts: no prefix reuse in the floor
                model(b, **kw)
            for b in batches("zs", 32):
                model(b, **kw)
        for x in kv:
            x.requires_grad_(True)
        for ids, mask in _examples(pairs[0], "demo"):
            t = mask.nonzero()[:, 0]
            F.cross_entropy(model(ids[None])[0, t - 1], ids[t]).backward()
        for x in kv:
            x.grad = None
            x.requires_grad_(False)
        with torch.inference_mode():  # the fine-tuned model's forwards: same cost as the base
            for b in batches("zs", 32):
                model(b, **kw)

    prefix_floor, _ = _prefix_floor(pairs, cfg.lr)

    def ours():
        ip.compare(model, task, k=args.k, queries=args.queries, gd=cfg, baselines=(),
                   progress=False)

    # "lean": the same forwards unembedding only the last position (logits_to_keep=1), the
    # strictest floor: what remains is the transformer itself and the fine-tune
    times = interleaved({"floor": bare, "lean": lambda: bare(logits_to_keep=1),
                         "prefix floor": prefix_floor, "compare": ours}, args.repeats)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; sentiment, "
          f"{len(pairs)} queries, k={args.k}, shared protocol, Dai-FT on kv, no baseline runs")
    for name, ts in times.items():
        print(f"{name:>8}: {statistics.median(ts):7.2f} s (median of {len(ts)})")
    print(f"ratio compare / floor: {ratio(times, 'compare', 'floor'):.3f}")
    print(f"ratio compare / lean floor: {ratio(times, 'compare', 'lean'):.3f}")
    print(f"ratio compare / prefix floor: {ratio(times, 'compare', 'prefix floor'):.3f}")


def _padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, their attention mask, and each row's last real position."""
    lengths = torch.tensor([len(x) for x in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = x
    return ids, (torch.arange(ids.shape[1])[None] < lengths[:, None]).long(), lengths - 1


def _prefix_floor(pairs: list, lr: float):
    """The plain-transformers floor with prefix reuse (see the module docstring), checked for
    exactness against full prompts before it is returned: ``(run, icl_logits)``, the timed
    work and its ICL logits at each prompt's last position."""
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_cache_path(embedded_gguf_path())), dtype=torch.float32,
        trust_remote_code=False).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    P = shared_prefix_length(pairs)
    prefix = pairs[0].icl_ids[:P][None]
    suffix, s_mask, s_last = _padded([p.icl_ids[P:] for p in pairs])
    zs, z_mask, z_last = _padded([p.zs_ids for p in pairs])
    rows = torch.arange(len(pairs))
    kv = [m.weight for n, m in hf.named_modules() if n.endswith(("k_proj", "v_proj"))]
    examples = _examples(pairs[0], "demo")

    def last_logits(ids, mask, last, cache=None, offset=0):
        full = mask if cache is None else torch.cat(
            [torch.ones(len(ids), offset, dtype=torch.long), mask], 1)
        pos = offset + torch.arange(ids.shape[1])[None].expand(len(ids), -1)
        h = hf.model(input_ids=ids, attention_mask=full, position_ids=pos, cache=cache,
                     use_cache=cache is not None).last_hidden_state
        return hf.lm_head(h[rows[: len(ids)], last])

    def icl_logits():
        cache = hf.model(input_ids=prefix, use_cache=True).cache  # transformers 5.24: "cache"
        cache.batch_repeat_interleave(len(pairs))
        return last_logits(suffix, s_mask, s_last, cache, P)

    # The floor's own exactness check against full prompts, in float64: in float32 the two
    # paths differ by kernel rounding that depends on the CPU (below 1e-6 on an AVX2 machine,
    # 1.4e-6 on an AVX-512 one), which would hide a wrong mask or position below that level.
    # float32 -> float64 -> float32 gives back the same weights bit for bit.
    hf.double()
    with torch.inference_mode():
        full_ids, full_mask, full_last = _padded([p.icl_ids for p in pairs])
        full = last_logits(full_ids, full_mask, full_last)
        fast = icl_logits()
    hf.float()
    err = float((fast - full).abs().max() / full.abs().max())
    if not err < 1e-9:
        raise SystemExit(f"prefix floor: cached ICL logits differ from full prompts by {err:.1e}"
                         " (float64)")

    def run():
        with torch.inference_mode():
            icl_logits()
            last_logits(zs, z_mask, z_last)
        saved = [w.detach().clone() for w in kv]
        for w in kv:
            w.requires_grad_(True)
        for ids, mask in examples:
            t = mask.nonzero()[:, 0]
            loss = F.cross_entropy(hf(ids[None]).logits[0, t - 1], ids[t])
            loss.backward()
            with torch.no_grad():
                for w in kv:
                    w -= lr * w.grad
                    w.grad = None
        with torch.inference_mode():
            last_logits(zs, z_mask, z_last)
        with torch.no_grad():
            for w, s in zip(kv, saved):
                w.copy_(s)
                w.requires_grad_(False)

    def icl_only():
        with torch.inference_mode():
            return icl_logits()

    return run, icl_only


if __name__ == "__main__":
    main()
