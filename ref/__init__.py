"""refjax: pure, functional JAX reference implementations of Hugging Face transformer families.

    import refjax
    ckpt = refjax.load_checkpoint("golden/gpt2/lm")          # config.json + safetensors, as HF writes them
    out = refjax.gpt2.forward(ckpt.params, ckpt.config, ids)  # HF's output fields: out.logits, out.loss, ...

Layers (docs/design.md): `refjax.params` (what a checkpoint is: configs, param trees,
name tables, I/O), the building blocks (`nn`, `attention`, `rotary`, `cache`, `layers`,
`quant`, `heads`, `losses`), the HF shell (`shell`: inputs, head dispatch, losses,
outputs), one math core per family (`gpt2`, `arcee`, `roformer`, `ibert`, `mega`), and
`refjax.tooling` (the `refjax` command, verify, diff, the family registry).
"""

from refjax import arcee, gpt2, ibert, mega, roformer
from refjax.params.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from refjax.tooling.families import FAMILIES
from refjax.tooling.compare import compare

__all__ = ["FAMILIES", "Checkpoint", "arcee", "compare", "gpt2", "ibert", "load_checkpoint", "mega", "roformer",
           "save_checkpoint"]
__version__ = "0.1.0"
