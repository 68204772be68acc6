"""Train `tiny-add` (or `tiny-add-moe`): integer addition of up to 3-digit operands, with optax, on one device.

    python -m jaxpar.train.add --steps 12000 --out jaxpar/models/tiny_add/checkpoint
    python -m jaxpar.train.add --model tiny-add-moe --steps 12000 --out jaxpar/models/tiny_add_moe/checkpoint

Loss is on the answer and the end-of-sequence token only, plus, for a mixture-of-experts model, the
Switch-Transformer load-balancing loss (weight --aux-weight) so that every expert gets work. 1,000 held-out problems (fixed seed) never appear
in training; the script reports exact-match accuracy on them with greedy decoding through the engine."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jaxpar.tokenizer import BOS, EOS, PAD

SEQ = 16  # "999+999=1998" + BOS + EOS = 14 tokens
HELDOUT_SEED = 1234


def heldout_problems(n: int = 1000, seed: int = HELDOUT_SEED):
    rng = np.random.RandomState(seed)
    return [(int(a), int(b)) for a, b in zip(rng.randint(0, 1000, n), rng.randint(0, 1000, n))]


def _operands(rng, n):
    """Half uniform over 0..999 (like the held-out set, mostly 3-digit carries), half with the digit count
    uniform in 1..3, so short numbers are common enough too."""
    digits = rng.randint(1, 4, size=n)
    lo = np.where(digits == 1, 0, 10 ** (digits - 1))
    by_length = rng.randint(lo, 10 ** digits)
    return np.where(rng.rand(n) < 0.5, rng.randint(0, 1000, size=n), by_length)


def make_batch(rng, n: int, exclude: set):
    tokens = np.full((n, SEQ), PAD, np.int32)
    mask = np.zeros((n, SEQ), np.float32)  # 1 where the *target* (next token) is part of the answer
    a, b = _operands(rng, n), _operands(rng, n)
    for i in range(n):
        while (int(a[i]), int(b[i])) in exclude:
            a[i], b[i] = _operands(rng, 1)[0], _operands(rng, 1)[0]
        prompt = [BOS] + list(f"{a[i]}+{b[i]}=".encode())
        answer = list(str(a[i] + b[i]).encode()) + [EOS]
        seq = prompt + answer
        tokens[i, :len(seq)] = seq
        mask[i, len(prompt) - 1:len(seq) - 1] = 1.0
    return tokens, mask


def upcycle(dense: dict, moe: dict, noise: float, seed: int) -> dict:
    """Sparse upcycling (Komatsuzaki et al. 2022): a mixture-of-experts model starts from a trained dense one.
    Every parameter but the MLP is copied; each expert starts as the dense MLP plus a little noise (so the
    experts can diverge), and the router keeps its random initialisation. With top-k weights renormalised to
    sum to 1 and noise 0 the upcycled model computes exactly the dense one."""
    import numpy as np
    rng = np.random.RandomState(seed)
    out = {k: v for k, v in dense.items() if k != "group0"}  # both models: one group of identical layers
    block = {k: v for k, v in dense["group0"]["block0"].items() if k != "mlp"}
    mlp = {"router": moe["group0"]["block0"]["mlp"]["router"]}
    for name in ("w_gate", "w_up", "w_down"):
        w = np.asarray(dense["group0"]["block0"]["mlp"][name])  # [layers, ...]
        e = moe["group0"]["block0"]["mlp"][name].shape[1]
        stacked = np.repeat(w[:, None], e, axis=1)
        mlp[name] = (stacked + noise * w.std() * rng.standard_normal(stacked.shape)).astype(w.dtype)
    block["mlp"] = mlp
    out["group0"] = {"block0": block}
    return out


def train(steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0, log_every: int = 100, log=None,
          model: str = "tiny-add", aux_weight: float = 0.01, init_from: str | None = None, noise: float = 0.05):
    """Returns (config, params, losses). init_from: a dense checkpoint to upcycle into `model` (a
    mixture-of-experts config with the same shapes otherwise)."""
    log = log or (lambda msg: print(msg, flush=True))
    import jax
    import jax.numpy as jnp
    import optax

    from jaxpar.config import load_config
    from jaxpar.engine import params as P

    cfg = load_config(model)
    _, abstract = P.abstract_model(cfg)
    from flax import nnx
    with nnx.use_eager_sharding(False):
        from jaxpar.model.decoder import Decoder
        params = nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(seed)), nnx.Param))
    if init_from:
        import jaxpar
        dense = jaxpar.load(mesh="single", checkpoint=init_from, devices=jax.devices()[:1])
        params = jax.tree.map(jnp.asarray, upcycle(dense.params, params, noise, seed))
        log(f"upcycled from {init_from} ({dense.config.intermediate_size}-wide MLP -> "
            f"{cfg.num_local_experts} experts)")
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), max(steps, 2), lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)

    def loss_fn(p, tokens, mask):
        model = P.bind(cfg, 1, p)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, _, stats = model(tokens, pos, valid=tokens != PAD, router_aux=True)
        logits = model.logits(h)[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        m = mask[:, :-1]
        loss = jnp.sum(ce * m) / jnp.sum(m)
        return loss + aux_weight * jnp.mean(stats["aux"]) if "aux" in stats else loss

    @jax.jit
    def step(p, s, tokens, mask):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens, mask)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.RandomState(seed + 1)
    exclude = set(heldout_problems())
    losses, t0 = [], time.time()
    for i in range(steps):
        tokens, mask = make_batch(rng, batch, exclude)
        params, opt_state, loss = step(params, opt_state, tokens, mask)
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            log(f"step {i + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - t0:.0f}s)")
    return cfg, params, losses


def accuracy(engine, problems) -> float:
    prompts = [f"{a}+{b}=" for a, b in problems]
    outs = engine.generate(prompts, max_new_tokens=6)
    return float(np.mean([o == str(a + b) for o, (a, b) in zip(outs, problems)]))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jaxpar.train.add", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-add", help="shipped config to train (tiny-add or tiny-add-moe)")
    ap.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight (MoE)")
    ap.add_argument("--init-from", help="dense checkpoint to upcycle into the mixture-of-experts --model")
    ap.add_argument("--noise", type=float, default=0.05, help="upcycling: noise added to each expert (x std)")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="checkpoint directory to write (default: none)")
    args = ap.parse_args(argv)
    cfg, params, losses = train(args.steps, args.batch, args.lr, args.seed, model=args.model,
                                aux_weight=args.aux_weight, init_from=args.init_from, noise=args.noise)
    from jaxpar.engine import checkpoint as ckpt
    from jaxpar.engine.engine import Engine
    from jaxpar.layout.mesh_file import parse_mesh
    from jaxpar.layout.plan import plan_layout
    from jaxpar.tokenizer import ByteTokenizer
    import jax
    ml = plan_layout(parse_mesh({}, "single"), cfg, jax.devices()[:1])
    acc = accuracy(Engine(cfg, ml, jax.device_put(params, jax.devices()[0]), ByteTokenizer()), heldout_problems())
    print(json.dumps({"steps": args.steps, "final_loss": float(np.mean(losses[-100:])), "heldout_accuracy": acc}))
    if args.out:
        ckpt.save(args.out, cfg, params)
        with open(os.path.join(args.out, "train_stats.json"), "w") as f:
            json.dump({"model": args.model, "init_from": args.init_from and os.path.relpath(args.init_from),
                       "noise": args.noise, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                       "seed": args.seed, "aux_weight": args.aux_weight,
                       "final_loss": float(np.mean(losses[-100:])), "heldout_accuracy": acc}, f, indent=1)


if __name__ == "__main__":
    main()
