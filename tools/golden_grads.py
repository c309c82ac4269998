"""Gradient goldens for tools/make_golden.py: HF autograd's gradient of the loss.

For each case in `CASES`, after the case's builder has written its checkpoint and
golden.safetensors, the checkpoint is loaded back with `from_pretrained` (exactly the
weights refjax will load), run on the case's recorded inputs in eval mode, and
`loss.backward()` gives

  - `{dtype}/param/{name}`: d loss / d parameter for every trainable parameter in
    `named_parameters()` order (tied parameters once, as HF lists them; a parameter the
    loss does not reach, whose `.grad` stays None, is recorded as zeros and named in the
    metadata's `unused`);
  - `{dtype}/inputs_embeds`: d loss / d inputs_embeds, from a second call in which the
    input ids are replaced by `{dtype}.inputs_embeds` = the model's own input embedding
    of those ids (detached), everything else unchanged;
  - `{dtype}/loss` and `{dtype}/embeds_loss`: the two losses differentiated.

in float32 and float64, written to `grad.safetensors` beside golden.safetensors. The
metadata names the state-dict entries without a record (`not_recorded`: buffers, tied aliases
and parameters with requires_grad=False such as RoFormer's sinusoid table), so a checker knows which of
its own gradients have no HF counterpart, and the dtype HF computed each loss in
(`loss_dtype`: HF's causal-LM and token-classification losses upcast logits to float32,
so a float64 model's loss, and hence its gradients, are float32-accurate).

I-BERT runs in float mode only: its quant mode backpropagates through HF's
straight-through estimators (round/floor treated as identity), which refjax does not
implement (its quantizers have the exact derivative, zero almost everywhere).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

# A few cases per family, both dtypes: an LM loss, a classification loss and one more head.
CASES = (
    "gpt2/lm", "gpt2/seqcls-single", "gpt2/qa",
    "arcee/causal-lm-tied", "arcee/seqcls-single", "arcee/bias",
    "roformer/mlm", "roformer/causal-lm", "roformer/mc-summary-first-proj",
    "ibert/seqcls", "ibert/mlm", "ibert/qa",
    "mega/causal-lm", "mega/masked-lm", "mega/seqcls-single",
)
FILE = "grad.safetensors"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "start_positions",
               "end_positions")


def read_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a golden.safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _call(model, arrays: dict[str, np.ndarray], dtype, embeds=None):
    """HF forward (eval mode, no cache) on numpy inputs; floating inputs cast to dtype.

    HF's MEGA EMA caches its kernel and coefficients in eval mode (`_kernel`, `_coeffs`)
    across calls, and with them the autograd graph of the first call and its dtype: they
    are cleared before every call, so each forward computes them from the parameters."""
    import torch

    for module in model.modules():
        for cache in ("_kernel", "_coeffs"):
            if getattr(module, cache, None) is not None:
                setattr(module, cache, None)
    kwargs = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        kwargs[k] = t.to(dtype) if t.is_floating_point() else t
    if embeds is not None:
        kwargs.pop("input_ids")
        kwargs["inputs_embeds"] = embeds
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs, return_dict=True).loss


def hf_gradients(model, inputs: dict[str, np.ndarray], dtype_name: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The records of one dtype (see the module docstring) and the unused parameters."""
    import torch

    dtype = getattr(torch, dtype_name)
    model.to(dtype)
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = _call(model, inputs, dtype)
    loss.backward()
    record, unused = {f"{dtype_name}/loss": loss.detach().numpy().copy()}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            unused.append(name)
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        record[f"{dtype_name}/param/{name}"] = grad.detach().numpy().copy()

    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.from_numpy(inputs["input_ids"]))
    embeds = (embeds[0] if isinstance(embeds, tuple) else embeds).detach().clone()  # I-BERT: (embeds, scale)
    record[f"{dtype_name}.inputs_embeds"] = embeds.numpy().copy()
    embeds.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    embeds_loss = _call(model, inputs, dtype, embeds=embeds)
    embeds_loss.backward()
    record[f"{dtype_name}/embeds_loss"] = embeds_loss.detach().numpy().copy()
    record[f"{dtype_name}/inputs_embeds"] = embeds.grad.detach().numpy().copy()
    model.zero_grad(set_to_none=True)
    return record, unused


def write(lib, name: str, case_dir: Path) -> None:
    """Write `case_dir/grad.safetensors` for a case whose checkpoint and golden are written."""
    import torch
    import transformers

    config = json.loads((case_dir / "config.json").read_text())
    (architecture,) = config["architectures"]
    golden, meta = read_golden(case_dir / "golden.safetensors")
    if json.loads(meta.get("forward_variants", "[{}]")) != [{}] or config.get("quant_mode"):
        raise ValueError(f"{name}: gradient goldens are float-mode only, one forward per case")
    model = getattr(transformers, architecture).from_pretrained(case_dir, attn_implementation="eager")
    state_names = set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    record, unused, loss_dtype = {}, set(), {}
    for dtype_name in lib.DTYPES:
        inputs = {k: golden.get(f"{dtype_name}.{k}", golden[k]) for k in INPUT_NAMES if k in golden}
        if "input_ids" not in inputs:
            raise ValueError(f"{name}: gradient goldens need input_ids (their embedding is the inputs_embeds)")
        part, dtype_unused = hf_gradients(model, inputs, dtype_name)
        for key, value in part.items():
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise RuntimeError(f"{name}: HF {key} is not finite")
        record.update(part)
        unused |= set(dtype_unused)
        loss_dtype[dtype_name] = str(part[f"{dtype_name}/loss"].dtype)
    metadata = {
        "case": name, "architecture": architecture,
        "description": "HF autograd gradients of the loss w.r.t. every trainable parameter and inputs_embeds "
                       "(tools/golden_grads.py)",
        "not_recorded": json.dumps(sorted(state_names - trainable)),
        "unused": json.dumps(sorted(unused)),
        "loss_dtype": json.dumps(loss_dtype, sort_keys=True),
        "transformers": transformers.__version__, "torch": torch.__version__,
    }
    lib.atomic_write_bytes(case_dir / FILE, lib.safetensors_bytes(record, metadata))
