"""Decoding speed: milliseconds per generated token of the RL step's sampler, three ways, on this machine.

- `generate`: transformers' `generate` at the same law (what TRL's RLOOTrainer calls);
- `eager`: `sampling.sample_completions`, the lean KV-cache loop 02 uses by default;
- `compiled`: the same with `compiled=True` (`WarpConfig.compile_generation`): a fixed-size cache and one
  `torch.compile`d decode step, replayed as a CUDA graph on a GPU. Its one-off compilation is timed apart.

Two models with random weights: GPT-2 small (the imdb preset's policy) and `narrow`: GPT-2 small's 12
layers, 16 wide with 2 heads and 512 tokens, the same operations with negligible arithmetic, so that its
time per token is what the host spends issuing them: the part a fast GPU leaves to the CPU. Prompts of 15
tokens, 53 new tokens (the imdb preset's), EOS never drawn, so every row decodes every token; mixed
precision as 02's "auto" (bf16 or fp16 on a GPU, none on the CPU). Also reports whether `compiled` drew
exactly `eager`'s tokens from the same seed.

    python bench/decoding.py                        # 32 and 64 rows, both models
    python bench/decoding.py --rows 32 --models narrow --repeats 3
    python bench/decoding.py --smoke                # tiny sizes; tests/test_bench_rl.py runs it
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import runs  # noqa: E402
import sampling  # noqa: E402
from bench import machine  # noqa: E402

MODELS = {  # GPT2Config overrides
    "gpt2-small": {},
    "narrow": dict(n_embd=16, n_head=2, vocab_size=512),  # GPT-2 small's 12 layers, the same operations
}
SMOKE = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64)
METHODS = ("generate", "eager", "compiled")


def build(model: str, smoke: bool, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**(SMOKE if smoke else MODELS[model]))
    return GPT2LMHeadModel(cfg).to(device).eval()


def decode(method: str, model, ids, new_tokens: int, temperature: float):
    """(B, new_tokens) ids drawn by `method`; EOS is the id past the vocabulary, so never drawn."""
    eos, mask = model.config.vocab_size, torch.ones_like(ids)
    if method == "generate":
        cfg = sampling.sampling_config(new_tokens, temperature, eos_token_id=eos, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        return out[:, ids.shape[1] :]
    return sampling.sample_completions(
        model, ids, mask, max_new_tokens=new_tokens, temperature=temperature, eos_token_id=eos,
        compiled=method == "compiled",
    )[0]  # fmt: skip


def measure(model, rows: int, args, device: torch.device, autocast) -> dict:
    """Per method: the median seconds per token over `repeats` timed calls after a warm-up call."""
    ids = torch.randint(0, model.config.vocab_size, (rows, args.prompt_tokens), device=device)
    out, drawn = {}, {}
    for method in METHODS:
        with autocast():
            start = time.perf_counter()
            torch.manual_seed(1)
            drawn[method] = decode(method, model, ids, args.new_tokens, args.temperature)  # warm-up / compile
            machine.sync()
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                decode(method, model, ids, args.new_tokens, args.temperature)
                machine.sync()
                times.append(time.perf_counter() - start)
        per_token = statistics.median(times) / args.new_tokens
        out[method] = {
            "ms_per_token": 1e3 * per_token,
            "tokens_per_s": rows / per_token,
            "first_call_s": first,
        }
    same = drawn["compiled"] == drawn["eager"]
    out["compiled_draws_eager_tokens"] = bool(same.all())
    out["first_difference_at"] = None if same.all() else int((~same).any(0).nonzero()[0])
    return out


def table(report: dict) -> str:
    """The report as markdown: the machine and settings, then one row per model and row count."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Decoding benchmark ({report['date']})",
        "",
        f"{machine.line(m, m['torch_threads'])}; mixed precision {s['precision']}. Prompts of "
        f"{s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, median of {s['repeats']} calls"
        + (" (SMOKE: the numbers mean nothing)" if s["smoke"] else "")
        + ".",
        "",
        "| model | rows | generate ms/token | eager ms/token | compiled ms/token | generate / compiled "
        "| compile + first call s | compiled = eager draws |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        g, e, c = (r[k]["ms_per_token"] for k in METHODS)
        same = "yes" if r["compiled_draws_eager_tokens"] else f"no (from token {r['first_difference_at']})"
        lines.append(
            f"| {r['model']} | {r['rows']} | {g:.2f} | {e:.2f} | {c:.2f} | {g / c:.1f}x "
            f"| {r['compiled']['first_call_s']:.1f} | {same} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--rows", nargs="+", type=int, default=[32, 64], help="completions decoded at once")
    p.add_argument("--prompt-tokens", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=53)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method after one warm-up call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model, 4 rows, 4 tokens, 1 call")
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "bench_decoding"), help="folder of decoding.{json,md}"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.rows, args.new_tokens, args.repeats = args.models[:1], [4], 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = runs.mixed_precision_for("auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "settings": {
            "precision": precision,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "temperature": args.temperature,
            "repeats": args.repeats,
            "smoke": args.smoke,
        },  # fmt: skip
        "results": [],
    }
    for name in args.models:
        model = build(name, args.smoke, device)
        for rows in args.rows:
            print(f"[decoding] {name}, {rows} rows ...", file=sys.stderr)
            report["results"].append(
                {"model": name, "rows": rows, **measure(model, rows, args, device, autocast)}
            )
        del model
    text = table(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decoding.json").write_text(json.dumps(report, indent=1))
    (out / "decoding.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
