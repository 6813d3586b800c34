"""Checks of the encoder architecture and its masked-LM objective: the combinations an encoder
(BERT) supports, and the masking settings of the pipeline."""

from __future__ import annotations

from flaxlm.config.checks import require
from flaxlm.config.enums import BYTE_MASK_ID, Arch, Objective, Position, TokenizerKind
from flaxlm.config.schema import Config


def validate_mlm(cfg: Config) -> None:
    """train.objective and model.arch agree; an encoder uses only the options it supports."""
    m, d, t = cfg.model, cfg.data, cfg.train
    encoder = m.arch == Arch.encoder
    require(
        encoder == (t.objective == Objective.mlm),
        f"train.objective={t.objective} does not fit model.arch={m.arch}: an encoder sees every "
        "token, so it trains with train.objective=mlm, and a decoder with train.objective=clm",
    )
    if not encoder:
        return
    require(0.0 < d.mask_rate < 1.0, f"data.mask_rate={d.mask_rate} must be in (0, 1) (BERT: 0.15)")
    require(m.type_vocab_size > 0, f"model.type_vocab_size={m.type_vocab_size} must be positive")
    unsupported = {
        "model.position": (m.position, m.position == Position.learned, "learned"),
        "model.scan_layers": (m.scan_layers, not m.scan_layers, "false"),
        "model.moe.num_experts": (m.moe.num_experts, not m.moe.enabled, "0"),
        "model.sliding_window": (m.sliding_window, m.sliding_window is None, "null"),
        "model.n_kv_heads": (m.n_kv_heads, m.kv_heads == m.n_heads, "null"),
        "model.post_norms": (m.post_norms, not m.post_norms, "false"),
        "model.tie_embeddings": (m.tie_embeddings, m.tie_embeddings, "true"),
        "data.token_cache": (d.token_cache, not d.token_cache, "null (the streaming pipeline)"),
        # Context parallelism reorders rows for a causal mask's load balance.
        "mesh.context": (cfg.mesh.context, cfg.mesh.context == 1, "1"),
        "mesh.dcn_context": (cfg.mesh.dcn_context, cfg.mesh.dcn_context == 1, "1"),
    }
    for key, (value, ok, fix) in unsupported.items():
        require(ok, f"{key}={value} is not supported by model.arch=encoder; set {key}={fix}")
    require(
        not t.eval_tasks,
        f"train.eval_tasks={t.eval_tasks} scores text continuations, which an encoder cannot "
        "generate; set train.eval_tasks=[]",
    )
    if d.tokenizer == TokenizerKind.byte:
        require(
            m.vocab_size > BYTE_MASK_ID,
            f"model.vocab_size={m.vocab_size} has no room for the byte tokenizer's [MASK] id "
            f"{BYTE_MASK_ID}; set model.vocab_size to at least {BYTE_MASK_ID + 1} (e.g. 320)",
        )
