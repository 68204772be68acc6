"""python -m jaxpar.generate: generate text with a model laid out on a mesh."""
from __future__ import annotations

import sys

from jaxpar.tools import cli


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


def print_stats(engine) -> None:
    sys.stdout.flush()
    s = engine.last_stats
    mib = 2 ** 20
    kv = engine.kv_cache_bytes_per_device()
    lines = [f"time to first token: {s['ttft_s'] * 1e3:.1f} ms (includes compilation on first use)",
             f"time per output token: {s['tpot_s'] * 1e3:.2f} ms (the decode loop's compilation too, on first use)",
             f"tokens/s: {s['tokens_per_s']:.1f} ({s['new_tokens']} new tokens, {s['prompts']} prompts)",
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
    p = cli.parser("generate", "Generate text with a model laid out on a device mesh.")
    cli.add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many new tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same tokens on every mesh")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template "
                                                        "(Hugging Face models with a chat_template)")
    p.add_argument("--stats", action="store_true", help="print timings and per-device memory to stderr")
    args = p.parse_args(argv)
    cli.start(args)
    from jaxpar.engine.engine import check_sampling
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    engine = cli.load_engine(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed)
    engine.check_tokenizer()
    if args.chat and not hasattr(engine.tokenizer, "chat"):
        cli.fail("--chat needs a Hugging Face model with a chat template (--hf or a converted checkpoint)")
    encode = engine.tokenizer.chat if args.chat else engine.tokenizer.encode
    ids = [encode(t) for t in args.prompt]
    if len(ids) == 1:
        stream = Streamer(engine.tokenizer)
        engine.generate_tokens(ids, on_token=stream, **kw)
        stream.finish()
    else:
        for out in engine.generate_tokens(ids, **kw):
            print(engine.tokenizer.decode(out))
    if args.stats:
        print_stats(engine)


if __name__ == "__main__":
    cli.run(main)
