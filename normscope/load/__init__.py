"""Load stage: checkpoint paths -> a diffusers pipeline and two velocity models (base, tuned).

* ``formats``: what a path holds (pipeline, transformer folder, state dict, peft / diffusers / kohya
  LoRA, a trainer's checkpoint folder) and which adapter to take, read from headers and configs only;
* ``lora``: any LoRA form -> peft adapter weights and config, attached to the pipeline's own transformer;
* ``pipeline``: the diffusers pipeline, safetensors only, no remote code;
* ``models``: the velocity models capture runs (full copies, or one module with an adapter on and off).

Checkpoints are untrusted data: safetensors by default, pickles only with ``allow_pickle`` and then
through ``torch.load(weights_only=True)``, never remote code.
"""

from normscope.load.formats import Checkpoint, find_checkpoint
from normscope.load.models import AdapterModel, LoadedModels, VelocityModel, load_base, load_models, load_tuned_only
from normscope.load.pipeline import find_pipeline_source, load_pipeline, resolve_device, resolve_dtype

__all__ = [
    "AdapterModel", "Checkpoint", "LoadedModels", "VelocityModel", "find_checkpoint", "find_pipeline_source",
    "load_base", "load_models", "load_pipeline", "load_tuned_only", "resolve_device", "resolve_dtype",
]
