"""Hugging Face checkpoints (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2, Mixtral, BERT) to
flaxlm run directories and back.

`from_hf(SRC, DST)` reads a local Hugging Face model directory (config.json and *.safetensors)
and writes DST as a flaxlm run directory: `config.yaml`, a step-0 checkpoint (parameters plus a
fresh optimizer state, so `train` can continue from it) and the tokenizer files under
`tokenizer/` (used by `flaxlm generate` and the lm-eval adapter). `to_hf(RUN_DIR, DST)` writes
config.json and model.safetensors that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(DST)` (a BERT: `BertForMaskedLM`).

Layouts: Hugging Face stores GPT-2 projections as Conv1D (in, out) with q, k and v concatenated,
and Llama projections as torch Linear (out, in); flaxlm keeps per-head kernels
(embed, heads, head_dim). Both use the rotate-half rotary convention, so Llama's q/k weights map
over without permutation.
"""

from flaxlm.convert.directories import from_hf, to_hf
from flaxlm.convert.hf_config import family, hf_config, model_overrides_from_hf
from flaxlm.convert.params import params_from_hf, params_to_hf

__all__ = [
    "family",
    "from_hf",
    "hf_config",
    "model_overrides_from_hf",
    "params_from_hf",
    "params_to_hf",
    "to_hf",
]
