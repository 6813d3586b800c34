"""The mixture-of-experts section of the model config (`model.moe`) and its checks.

With `num_experts` = 0 (the default) every feed-forward block is dense. Otherwise the sparse
layers replace their MLP by `num_experts` routed experts, of which each token uses
`experts_per_token`, plus `num_shared_experts` that every token uses (DeepSeek-MoE,
Qwen-MoE). Layer i is sparse when i >= first_dense_layers and (i - first_dense_layers) is a
multiple of `every`.
"""

from __future__ import annotations

import dataclasses

from flaxlm.config.checks import require, require_each
from flaxlm.config.enums import MoeDispatch, Router


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    # Routed experts per sparse layer; 0 means a dense model.
    num_experts: int = 0
    # Experts each token is sent to (top-k).
    experts_per_token: int = 2
    # Hidden width of one routed expert; None means model.d_ff (Mixtral). Fine-grained experts
    # (DeepSeek-MoE) are narrower than the dense MLP.
    d_expert: int | None = None
    # Experts every token goes through, added to the routed output (one MLP of width
    # num_shared_experts x d_expert).
    num_shared_experts: int = 0
    # The first layers stay dense (DeepSeek-MoE: 1); after them every `every`-th layer is sparse.
    first_dense_layers: int = 0
    every: int = 1
    router: Router = Router.topk_softmax
    # softmax_topk only: rescale the k kept probabilities to sum to 1 (Qwen3-MoE: yes,
    # DeepSeek-MoE and Qwen1.5-MoE: no). topk_softmax gates always sum to 1.
    normalize_gates: bool = False
    dispatch: MoeDispatch = MoeDispatch.dropless
    # capacity dispatch: each expert takes at most ceil(capacity_factor x tokens x k / experts)
    # tokens per batch (the rest are dropped: they skip the expert); <= 0 means no limit.
    capacity_factor: float = 1.25
    # Weight of the load-balancing loss E * sum_e f_e P_e / k (1.0 when perfectly balanced;
    # Switch Transformer) and of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE),
    # both averaged over the sparse layers and added to the training loss.
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


def is_sparse_layer(moe: MoeConfig, layer: int) -> bool:
    """Whether layer `layer` (0-based) has routed experts."""
    if not moe.enabled or layer < moe.first_dense_layers:
        return False
    return (layer - moe.first_dense_layers) % moe.every == 0


def expert_width(moe: MoeConfig, d_ff: int) -> int:
    return moe.d_expert or d_ff


def validate_moe(moe: MoeConfig, n_layers: int, scan_layers: bool) -> None:
    """Checks of model.moe that types cannot express; ConfigError names key, value and fix."""
    counts = ("num_experts", "num_shared_experts", "first_dense_layers")
    require_each(moe, "model.moe", counts, lambda v: v >= 0, "must be >= 0")
    if not moe.enabled:
        return
    sizes = ("experts_per_token", "every")
    require_each(moe, "model.moe", sizes, lambda v: v > 0, "must be positive")
    require(
        moe.experts_per_token <= moe.num_experts,
        f"model.moe.experts_per_token={moe.experts_per_token} exceeds model.moe.num_experts="
        f"{moe.num_experts}; lower it or add experts",
    )
    require(
        moe.d_expert is None or moe.d_expert > 0,
        f"model.moe.d_expert={moe.d_expert} must be positive or null (model.d_ff)",
    )
    require(
        moe.aux_loss_weight >= 0 and moe.z_loss_weight >= 0,
        f"model.moe.aux_loss_weight={moe.aux_loss_weight} and model.moe.z_loss_weight="
        f"{moe.z_loss_weight} must be >= 0",
    )
    require(
        moe.first_dense_layers < n_layers,
        f"model.moe.first_dense_layers={moe.first_dense_layers} leaves no sparse layer of "
        f"model.n_layers={n_layers}; lower it or set model.moe.num_experts=0",
    )
    # A scanned stack repeats one block: the dense prefix is scanned on its own, but the
    # sparse part must be uniform.
    require(
        not scan_layers or moe.every == 1,
        f"model.moe.every={moe.every} with model.scan_layers=true: a scanned stack needs every "
        "layer after model.moe.first_dense_layers sparse; set every=1 or scan_layers=false",
    )
