"""Decoding speed: the key/value cache against recomputing the whole sequence every step.

    python benchmarks/decode.py [--lengths 64 128 256] [--batch 4]

For each total length (prompt of 8 tokens + new tokens), times greedy generation of a batch
with flaxlm's cached decoder and with a jitted loop that reruns the full forward pass over a
fixed-size buffer at every step (what a decoder without cache does), both compiled and warmed
up first, and prints one JSON line with tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlm import config
from flaxlm.generate import SamplingConfig, left_pad_prompts, prefill_and_decode
from flaxlm.model import Transformer


@functools.partial(jax.jit, static_argnums=(0, 3))
def recompute_decode(model, params, buffer, steps, start):
    """Greedy decoding that reruns the model over the whole buffer for each new token."""

    def body(i, buffer):
        cur = start + i
        segments = (jnp.arange(buffer.shape[1]) < cur).astype(jnp.int32)[None]
        segments = jnp.broadcast_to(segments, buffer.shape)
        logits = model.apply({"params": params}, buffer, None, segments)
        token = jnp.argmax(logits[:, cur - 1], axis=-1).astype(jnp.int32)
        return buffer.at[:, cur].set(token)

    return jax.lax.fori_loop(0, steps, body, buffer)


def best_of(fn, repeats=3) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--preset", default="gpt2-byte-small")
    args = parser.parse_args()
    prompt_len = 8
    for length in args.lengths:
        cfg = config.load(
            Path(__file__).resolve().parent.parent / "configs" / "models" / f"{args.preset}.yaml",
            [f"model.max_seq_len={length}", f"data.seq_len={min(length, 256)}"],
        )
        model = Transformer(cfg.model)
        params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
            "params"
        ]
        prompts = [[256] + [65 + i] * (prompt_len - 1) for i in range(args.batch)]
        steps = length - prompt_len
        tokens, positions, segments = (jnp.asarray(a) for a in left_pad_prompts(prompts, 258))
        lengths = jnp.full((args.batch,), prompt_len, jnp.int32)
        decoder = Transformer(cfg.model, decode=True)
        cached = best_of(
            functools.partial(
                prefill_and_decode, decoder, params, tokens, positions, segments, lengths, steps,
                SamplingConfig(), -1, jax.random.key(0),
            )
        )  # fmt: skip
        buffer = jnp.zeros((args.batch, length), jnp.int32).at[:, :prompt_len].set(tokens)
        full = best_of(
            functools.partial(recompute_decode, model, params, buffer, steps, prompt_len)
        )
        new_tokens = args.batch * steps
        print(
            json.dumps(
                {
                    "length": length,
                    "batch": args.batch,
                    "cached_tokens_per_second": round(new_tokens / cached, 1),
                    "recompute_tokens_per_second": round(new_tokens / full, 1),
                    "speedup": round(full / cached, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
