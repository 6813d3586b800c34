"""lm-evaluation-harness adapter: `lm_eval` evaluates a flaxlm checkpoint.

    import lm_eval, flaxlm.harness  # registers the model type "flaxlm"
    lm_eval.simple_evaluate(model="flaxlm", model_args="checkpoint=runs/quickstart", tasks=[...])

or from the shell: `lm_eval --model flaxlm --model_args checkpoint=RUN_DIR --tasks ...` with
`--include_path` for local tasks (the module must be imported first; `python -m flaxlm.harness`
runs lm_eval's command line with it registered).

Training evaluates harness tasks on its parameters in memory through `FlaxLM.from_params`
(`flaxlm.eval_tasks`). Scoring runs on any mesh and any number of processes (each process
makes the same calls and reads the replicated scores); decoding (`generate_until`) runs in
one process.

Scoring pads requests to a few fixed lengths (multiples of 64) so that the jitted forward pass
compiles a handful of times, not once per request.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from flaxlm.config import ConfigError
from flaxlm.data.tokenizer import ByteTokenizer, Tokenizer
from flaxlm.generate import SamplingConfig, check_decoder, generate
from flaxlm.mesh import replicated
from flaxlm.run_dir import load_run, load_tokenizer
from flaxlm.train import Trainer

_BUCKET = 64


@register_model("flaxlm")
class FlaxLM(LM):
    """A flaxlm model for lm-eval: from a run directory (`FlaxLM(checkpoint=RUN_DIR)`, what
    `model_args` builds) or from parameters in memory (`FlaxLM.from_params`, the training
    loop's downstream evaluation)."""

    def __init__(self, checkpoint: str, step: int | None = None, batch_size: int | str = 8, **_):
        super().__init__()
        _, trainer, params, step = load_run(checkpoint, None if step is None else int(step))
        self._attach(trainer, params, load_tokenizer(checkpoint), step, batch_size)

    @classmethod
    def from_params(
        cls, trainer: Trainer, params: Any, tokenizer: Tokenizer, step: int = 0, batch_size: int = 8
    ) -> FlaxLM:
        """An adapter scoring `params` (arrays on trainer's mesh, as the train state holds them)
        with trainer's model; set `.params` and `.step` to score newer ones with the same
        compiled functions. On several processes every process must make the same calls."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._attach(trainer, params, tokenizer, step, batch_size)
        return lm

    def _attach(
        self, trainer: Trainer, params: Any, tokenizer: Tokenizer, step: int, batch_size: int | str
    ) -> None:
        check_decoder(trainer.cfg.model)  # the harness scores and writes continuations
        self.cfg, self.trainer, self.params, self.step = trainer.cfg, trainer, params, step
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = self.cfg.model.max_seq_len
        byte = isinstance(self.tokenizer, ByteTokenizer)
        # The token every sequence starts from: BOS where the model was trained with one.
        self.prefix_id = self.tokenizer.bos_id if (not byte or self.cfg.data.add_bos) else None
        if self.prefix_id is None:
            self.prefix_id = self.tokenizer.eos_id

    # -- scoring ----------------------------------------------------------------------------

    @functools.cached_property
    def _score_fn(self):
        model = self.trainer.model

        # Replicated results: every process reads them whole, whatever the mesh.
        @functools.partial(jax.jit, out_shardings=replicated(self.trainer.mesh))
        def score(params, tokens, segments):
            logits = model.apply({"params": params}, tokens, None, segments)
            logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            targets = tokens[:, 1:]
            picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
            greedy = jnp.argmax(logits[:, :-1], axis=-1) == targets
            return picked, greedy

        return score

    def _on_mesh(self, rows: np.ndarray) -> jax.Array:
        """rows (the same on every process) as one array replicated over trainer's mesh."""
        sharding = replicated(self.trainer.mesh)
        return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])

    def _score(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Log-probability and greedy-match of every token after the first, per sequence."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i : i + self.batch_size]
            width = min(self.max_length, _BUCKET * math.ceil(max(map(len, chunk)) / _BUCKET))
            tokens = np.zeros((self.batch_size, width), np.int32)
            segments = np.zeros((self.batch_size, width), np.int32)
            for row, seq in enumerate(chunk):
                tokens[row, : len(seq)] = seq
                segments[row, : len(seq)] = 1
            with self.trainer.context():
                picked, greedy = jax.device_get(
                    self._score_fn(self.params, self._on_mesh(tokens), self._on_mesh(segments))
                )
            for row, seq in enumerate(chunk):
                out.append((picked[row, : len(seq) - 1], greedy[row, : len(seq) - 1]))
        return out

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        sequences, spans = [], []
        for request in requests:
            context, continuation = request.args
            ctx = [self.prefix_id, *self._encode(context)]
            cont = self._encode(continuation)
            whole = (ctx + cont)[
                -(self.max_length) :
            ]  # keep the continuation, cut the oldest context
            sequences.append(whole)
            spans.append(len(cont))
        results = []
        for (picked, greedy), n in zip(self._score(sequences), spans, strict=True):
            results.append((float(picked[-n:].sum()) if n else 0.0, bool(greedy[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole texts, in windows of the model's context when longer."""
        results = []
        for request in requests:
            (text,) = request.args
            ids = self._encode(text)
            total = 0.0
            # Disjoint windows, each scored after a prefix token (lm-eval's convention).
            step = self.max_length - 1
            windows = [[self.prefix_id, *ids[s : s + step]] for s in range(0, len(ids), step)]
            for picked, _ in self._score(windows):
                total += float(picked.sum())
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        """Continuations of the requests, decoded in batches of `batch_size` prompts of similar
        length; each batch is left-padded to a power-of-two width and filled to the full batch
        size, so one compiled decoder serves every batch of a width."""
        if jax.process_count() > 1:
            raise ConfigError(
                "generate_until tasks run in one process (decoding is not multi-host); run "
                "them on a checkpoint with `python -m flaxlm.harness`, or keep train.eval_tasks "
                "to log-likelihood and multiple-choice tasks on a multi-host job"
            )
        results: list[str] = [""] * len(requests)
        groups: dict[tuple[SamplingConfig, int], list[tuple[int, list[int], list[str]]]] = {}
        for index, request in enumerate(requests):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = SamplingConfig(
                temperature=float(kwargs.get("temperature", 0.0))
                if kwargs.get("do_sample")
                else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            max_new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length // 2))
            ids = self.tokenizer.encode(context, add_bos=self.cfg.data.add_bos)
            ids = ids[-(self.max_length - max_new) :]  # the most recent context that fits
            groups.setdefault((sampling, max_new), []).append((index, ids, until))
        for (sampling, max_new), items in groups.items():
            items.sort(key=lambda item: len(item[1]))
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                rows = self._generate_batch([ids for _, ids, _ in batch], max_new, sampling)
                for (index, ids, until), row in zip(batch, rows, strict=False):
                    results[index] = _cut(self.tokenizer.decode(row[len(ids) :]), until)
        return results

    def _generate_batch(
        self, prompts: list[list[int]], max_new: int, sampling: SamplingConfig
    ) -> list[list[int]]:
        longest = max(len(p) for p in prompts)
        width = min(1 << max(longest - 1, 15).bit_length(), self.max_length - max_new)
        filled = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
        with self.trainer.context():
            return generate(
                self.trainer.model, self.params, filled, max_new, sampling,
                stop_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, pad_to=width,
            )[: len(prompts)]  # fmt: skip


def _cut(continuation: str, until: list[str]) -> str:
    """The text before the first stop sequence (what lm-eval expects)."""
    for stop in until:
        if stop and stop in continuation:
            continuation = continuation[: continuation.index(stop)]
    return continuation


def main(argv: Iterable[str] | None = None) -> Any:
    """`python -m flaxlm.harness ARGS`: lm_eval's command line with the flaxlm model registered."""
    from lm_eval.__main__ import cli_evaluate

    return cli_evaluate()


if __name__ == "__main__":
    main()
