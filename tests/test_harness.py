"""lm-evaluation-harness adapter: its scores against direct computation, and a local task."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from flaxlm.harness import FlaxLM  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, corpus_cache):
    from conftest import CONFIGS

    from flaxlm import config, loop

    run = tmp_path_factory.mktemp("harness") / "run"
    cfg = config.load(
        CONFIGS / "tiny.yaml",
        [f"train.run_dir={run}", f"data.cache_dir={corpus_cache}", "train.steps=10",
         "train.progress_bar=false", "train.sample_prompt=", "train.tensorboard=false"],
    )  # fmt: skip
    loop.run(cfg)
    return FlaxLM(checkpoint=str(run), batch_size=3)


def _direct_logprobs(lm, ids):
    logits = lm.trainer.model.apply({"params": lm.params}, np.asarray([ids], np.int32))
    logprobs = jax.nn.log_softmax(logits[0, :-1])
    return np.asarray([logprobs[i, ids[i + 1]] for i in range(len(ids) - 1)])


def _request(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_a_direct_forward_pass(adapter):
    pairs = [("The list", " of items"), ("def ", "f(x):"), ("A much longer context here", ".")]
    got = adapter.loglikelihood([_request("loglikelihood", p) for p in pairs])
    for (context, continuation), (score, _) in zip(pairs, got, strict=True):
        ctx = [adapter.prefix_id, *context.encode()]
        ids = ctx + list(continuation.encode())
        expected = _direct_logprobs(adapter, ids)[len(ctx) - 1 :].sum()
        assert score == pytest.approx(float(expected), rel=1e-5, abs=1e-4)


def test_rolling_loglikelihood_covers_every_token_even_past_the_context(adapter):
    short = "Return the sum of a and b."
    (got,) = adapter.loglikelihood_rolling([_request("loglikelihood_rolling", (short,))])
    expected = _direct_logprobs(adapter, [adapter.prefix_id, *short.encode()]).sum()
    assert got == pytest.approx(float(expected), rel=1e-5)
    long = short * 6  # 156 bytes over a 64-token context: three windows
    (got_long,) = adapter.loglikelihood_rolling([_request("loglikelihood_rolling", (long,))])
    windows = [long.encode()[s : s + 63] for s in range(0, len(long.encode()), 63)]
    expected = sum(_direct_logprobs(adapter, [adapter.prefix_id, *w]).sum() for w in windows)
    assert got_long == pytest.approx(float(expected), rel=1e-5)


def test_generate_until_takes_a_context_longer_than_the_model(adapter):
    long_context = "word " * 40  # 200 bytes over a 64-token context
    (text,) = adapter.generate_until(
        [_request("generate_until", (long_context, {"max_gen_toks": 8}))]
    )
    assert isinstance(text, str) and len(text.encode()) <= 8


def test_generate_until_stops_before_the_stop_sequence(adapter):
    (free,) = adapter.generate_until([_request("generate_until", ("The ", {"max_gen_toks": 16}))])
    assert len(free) > 4
    stop = free[2:4]
    (cut,) = adapter.generate_until(
        [_request("generate_until", ("The ", {"max_gen_toks": 16, "until": [stop]}))]
    )
    assert cut == free[: free.index(stop)]


def test_a_local_task_runs_end_to_end(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    rows = [
        {"question": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0},
        {"question": "The opposite of true is", "choices": [" false", " maybe"], "answer": 0},
        {"question": "Python lists are", "choices": [" mutable", " frozen"], "answer": 0},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=adapter,
        tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        bootstrap_iters=0,
        log_samples=True,
    )
    acc = out["results"]["tiny_choice"]["acc,none"]
    # The harness's accuracy is the fraction of rows whose answer scores highest, as we score it.
    expected = np.mean(
        [
            np.argmax([s for s, _ in adapter.loglikelihood(
                [_request("loglikelihood", (r["question"], c)) for c in r["choices"]]
            )]) == r["answer"]
            for r in rows
        ]
    )  # fmt: skip
    assert acc == pytest.approx(expected)


def test_generate_until_in_padded_batches_matches_one_request_at_a_time(adapter):
    from flaxlm.generate import SamplingConfig, generate

    contexts = ["The", "A list of", "def f(x):\n    return", "Python is a programming lang", "x"]
    requests = [_request("generate_until", (c, {"max_gen_toks": 6})) for c in contexts]
    batched = adapter.generate_until(requests)
    for context, text in zip(contexts, batched, strict=True):
        ids = adapter.tokenizer.encode(context, add_bos=adapter.cfg.data.add_bos)
        with adapter.trainer.context():
            (row,) = generate(
                adapter.trainer.model, adapter.params, [ids], 6, SamplingConfig(),
                stop_id=adapter.tokenizer.eos_id, pad_id=adapter.tokenizer.pad_id,
            )  # fmt: skip
        assert text == adapter.tokenizer.decode(row[len(ids) :])
