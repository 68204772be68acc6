"""python -m jaxpar.generate: generate text with a model laid out on a mesh."""
from __future__ import annotations

import json
import sys
import time

from jaxpar.errors import JaxparError
from jaxpar.tools import cli
from jaxpar.tools.compiles import CompileCounter


class Streamer:
    """Prints one prompt's tokens as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.shown:])
        sys.stdout.flush()
        self.shown = len(text)

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        sys.stdout.write(text[self.shown:] + "\n")
        sys.stdout.flush()


# ---- prompts --------------------------------------------------------------------------------------------------
JSONL_KEYS = ("prompt", "max_tokens")


def read_prompts(path: str) -> list[dict]:
    """--prompts-file: plain text, one prompt per line (blank lines skipped); or, for a name ending in .jsonl,
    one JSON object per line with "prompt" and optionally "max_tokens". -> [{"prompt", "max_tokens", "line"}]."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        raise JaxparError(f"--prompts-file {name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.endswith(".jsonl")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append({"prompt": line, "max_tokens": None, "line": n})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxparError(f"--prompts-file {name} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise JaxparError(f"--prompts-file {name} line {n}: expected a JSON object with a \"prompt\" string, "
                              f"got {line[:80]}")
        unknown = [k for k in obj if k not in JSONL_KEYS]
        if unknown:
            raise JaxparError(f"--prompts-file {name} line {n}: unknown key(s) {', '.join(unknown)}; allowed keys: "
                              f"{', '.join(JSONL_KEYS)}")
        m = obj.get("max_tokens")
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise JaxparError(f"--prompts-file {name} line {n}: max_tokens must be an integer >= 1, got {m!r}")
        out.append({"prompt": obj["prompt"], "max_tokens": m, "line": n})
    if not out:
        raise JaxparError(f"--prompts-file {name}: no prompts (the file is empty or holds only blank lines)")
    return out


# ---- generation -----------------------------------------------------------------------------------------------
def generate(engine, ids: list, limits: list, on_token=None, **kw) -> tuple[list, dict]:
    """Every prompt, with its own new-token limit: prompts that share a limit run together as one batch
    (generate_tokens takes one limit per call), so a file without per-line max_tokens is a single call and
    prompt i samples with seed + i. -> (outputs in prompt order, the run's statistics)."""
    seed = kw.pop("seed", 0)
    groups: dict = {}
    for i, m in enumerate(limits):
        groups.setdefault(m, []).append(i)
    outs, runs = [None] * len(ids), []
    per = {"finish_reasons": [None] * len(ids), "max_new": [None] * len(ids)}
    t0 = time.perf_counter()
    for m, idx in groups.items():
        res = engine.generate_tokens([ids[i] for i in idx], max_new_tokens=m, on_token=on_token,
                                     seed=(seed + idx[0]) % 2 ** 63, **kw)
        s = engine.last_stats
        runs.append((s, max(len(o) for o in res)))
        for j, i in enumerate(idx):
            outs[i] = res[j]
            for key in per:
                per[key][i] = s[key][j]
    return outs, dict(merge_stats(runs, time.perf_counter() - t0), **per)


def merge_stats(runs: list, seconds: float) -> dict:
    """One set of statistics for several generate_tokens calls run one after another ([(last_stats, decode
    steps)]): time to first token of the first, time per output token over all their decode steps."""
    if len(runs) == 1:
        return dict(runs[0][0])
    first = runs[0][0]
    steps = sum(max(n - 1, 1) for _, n in runs)
    new = sum(s["new_tokens"] for s, _ in runs)
    out = {"prompts": sum(s["prompts"] for s, _ in runs), "new_tokens": new, "ttft_s": first["ttft_s"],
           "tpot_s": sum(s["tpot_s"] * max(n - 1, 1) for s, n in runs) / steps, "tokens_per_s": new / seconds}
    experts = [s["experts"] for s, _ in runs if s.get("experts")]
    if experts:  # each run's per-layer sums are one more term of the same sum
        from jaxpar.engine.engine import summarise_expert_stats
        out["experts"] = summarise_expert_stats([{"load": e["tokens_per_expert"], "dropped": e["dropped"]}
                                                 for e in experts])
    return out


def notes(engine, ids: list, outs: list, limits: list, stats: dict, labels: list) -> list[str]:
    """Why a completion is shorter than asked for, or empty: one line per affected prompt."""
    ctx = engine.serving.max_model_len
    lines = []
    for i, (p, o, m) in enumerate(zip(ids, outs, limits)):
        reason, bound = stats["finish_reasons"][i], stats["max_new"][i]
        why = None
        if reason == "abort":
            why = f"aborted after {len(o)} of {m} new tokens"
        elif reason == "length" and bound < m and len(o) == bound:  # the scheduler bounded it by the context
            why = (f"nothing generated: its {len(p)} tokens fill the context window (max_model_len {ctx})"
                   if bound == 0 else
                   f"stopped after {len(o)} of {m} new tokens: the context window (max_model_len {ctx}) is full")
        elif o and not engine.tokenizer.decode(o):
            why = (f"the {len(o)} generated ids decode to no text (the model emits ids the tokenizer has no text "
                   f"for: a model with random weights?)")
        if why:
            lines.append(f"note: {labels[i]}: {why}")
    return lines


def programs(n: int) -> str:
    return f"{n} program" + ("" if n == 1 else "s")


def print_stats(engine, s: dict, first: dict) -> None:
    """The compilations of the untimed first run (first: {"programs", "seconds"}), the timed run's steady-state
    timings and the programs it compiled (s["compiles"]: none, when the first run compiled them all), and
    per-device memory, on stderr."""
    sys.stdout.flush()
    mib = 2 ** 20
    kv = engine.kv_cache_bytes_per_device()
    n = s["compiles"]
    lines = [f"compile: {programs(first['programs'])} in {first['seconds']:.1f} s (an untimed first run)",
             f"time to first token: {s['ttft_s'] * 1e3:.1f} ms",
             f"time per output token: {s['tpot_s'] * 1e3:.2f} ms",
             f"tokens/s: {s['tokens_per_s']:.1f} ({s['new_tokens']} new tokens, {s['prompts']} prompts)",
             f"compiled during the timed run: {programs(n)}" +
             (" (expected none: the timings above include their compilation)" if n else ""),
             f"memory per device: params {engine.params_bytes_per_device() / mib:.2f} MiB, "
             f"KV cache {kv / mib:.2f} MiB ({engine.sizes.pool_pages // engine.sizes.batch_shards // engine.sizes.seq_shards} "
             f"pages of {engine.sizes.page_size} tokens per device; {engine.mesh.size} devices)"]
    ex = s.get("experts")
    if ex:
        lines.append(f"expert load: {ex['assignments']} token-expert assignments, {ex['dropped_total']} dropped "
                     f"(past capacity)")
        for i, (load, imb, drop) in enumerate(zip(ex["tokens_per_expert"], ex["imbalance"], ex["dropped"])):
            lines.append(f"  layer {i}: tokens per expert {load}, max/mean {imb:.2f}, dropped {drop}")
    for line in lines:
        print(f"stats: {line}", file=sys.stderr)


def main(argv=None):
    p = cli.parser("generate", "Generate text with a model laid out on a device mesh: one completion per prompt "
                               "on stdout, and on stderr a note for each completion cut short or without text.")
    cli.add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    src.add_argument("--prompts-file", metavar="PATH",
                     help="read the prompts from a file ('-' = stdin): plain text, one prompt per line (blank "
                          "lines skipped), one completion per line out (a completion holding a newline spans "
                          "lines: use .jsonl to keep them apart); or, for a name ending in .jsonl, one JSON "
                          "object per line, {\"prompt\": ..., \"max_tokens\": N (optional)}, and one JSON line "
                          "out per prompt with prompt, completion, finish_reason, prompt_tokens and "
                          "completion_tokens")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="stop after this many new tokens (default 32; fewer when the context window ends first)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same tokens on every mesh")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template "
                                                        "(Hugging Face models with a chat_template)")
    p.add_argument("--stats", action="store_true",
                   help="run the prompts twice: an untimed first run (output discarded) that compiles the "
                        "programs, then the timed run; print the compile count and time, the timed run's "
                        "steady-state time to first token, time per output token and tokens/s, and per-device "
                        "memory (stderr)")
    args = p.parse_args(argv)
    cli.start(args)
    from jaxpar.engine.engine import check_sampling
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    if args.prompts_file is not None:
        items = read_prompts(args.prompts_file)  # before loading too: a bad file fails at once
        name = "stdin" if args.prompts_file == "-" else args.prompts_file
        labels = [f"prompt {i} ({name} line {x['line']})" for i, x in enumerate(items)]
    else:
        items = [{"prompt": t, "max_tokens": None} for t in args.prompt]
        labels = [f"prompt {i}" for i in range(len(items))]
    jsonl = (args.prompts_file or "").endswith(".jsonl")
    engine = cli.load_engine(args)
    engine.check_tokenizer()
    if args.chat and not hasattr(engine.tokenizer, "chat"):
        cli.fail("--chat needs a Hugging Face model with a chat template (--hf or a converted checkpoint)")
    encode = engine.tokenizer.chat if args.chat else engine.tokenizer.encode
    ids = [encode(x["prompt"]) for x in items]
    engine.check_prompts(ids)  # here, so that a message's "prompt i" counts over all the prompts
    limits = [x["max_tokens"] or args.max_new_tokens for x in items]
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.stats:  # an untimed first run of the same prompts compiles what the timed run needs
        with CompileCounter() as counter:
            t0 = time.perf_counter()
            generate(engine, ids, limits, **kw)
            first = {"programs": counter.n, "seconds": time.perf_counter() - t0}
    stream = Streamer(engine.tokenizer) if len(ids) == 1 and not jsonl else None
    with CompileCounter() as counter:
        outs, stats = generate(engine, ids, limits, on_token=stream, **kw)
    stats["compiles"] = counter.n
    if stream is not None:
        stream.finish()
    for x, i, o, reason in zip(items, ids, outs, stats["finish_reasons"]):
        text = engine.tokenizer.decode(o)
        if jsonl:
            print(json.dumps({"prompt": x["prompt"], "completion": text, "finish_reason": reason,
                              "prompt_tokens": len(i), "completion_tokens": len(o)}, ensure_ascii=False))
        elif stream is None:
            print(text)
    sys.stdout.flush()
    for line in notes(engine, ids, outs, limits, stats, labels):
        print(line, file=sys.stderr)
    if args.stats:
        print_stats(engine, stats, first)


if __name__ == "__main__":
    cli.run(main)
