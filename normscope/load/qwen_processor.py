"""Qwen-Image-Edit's text encoder processor without torchvision (issue 19).

``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` hold a ``Qwen2VLProcessor``: the Qwen2.5-VL encoder
reads the condition image through it. In transformers 5 that processor cannot even be constructed without
torchvision: its video processor (``Qwen2VLVideoProcessor``) needs torchvision, and the processor checks every
sub-processor's class, ``None`` included. The edit pipelines never pass videos. So normscope builds the processor
from the PIL classes, the way transformers falls back for image processors: ``Qwen2VLImageProcessorPil`` (the
slow, PIL-based image processor, read from the folder's ``processor/preprocessor_config.json``) and the folder's
``Qwen2Tokenizer``, in a ``Qwen2VLProcessor`` subclass without the video processor. With torchvision installed
the pipeline's own loader is used unchanged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


# The processors normscope rebuilds without torchvision: Qwen-Image-Edit's Qwen2VLProcessor and (issue 19, condition
# images) Qwen-Image-2.1's Qwen3VLProcessor; both read images with the same PIL image processor class.
PIL_PROCESSORS = ("Qwen2VLProcessor", "Qwen3VLProcessor")


def pil_processor_class(base: str = "Qwen2VLProcessor"):
    """``base`` (``Qwen2VLProcessor`` or ``Qwen3VLProcessor``) without a video processor: its sub-processors are
    the image processor and tokenizer. Named ``Pil<base>``."""
    import transformers

    parent = getattr(transformers, base)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        parent.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    doc = f"A ``{base}`` on ``Qwen2VLImageProcessorPil``, without the (torchvision) video processor."
    return type(f"Pil{base}", (parent,), {"__init__": __init__, "__doc__": doc})


def pil_processor(image_processor, tokenizer, base: str = "Qwen2VLProcessor", chat_template=None):
    return pil_processor_class(base)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_pil_processor(folder: str | Path, base: str = "Qwen2VLProcessor"):
    """The processor of a Qwen-Image-Edit (or Qwen-Image-2.1, ``base="Qwen3VLProcessor"``) folder (``processor/``,
    falling back to ``tokenizer/`` for the text files), built from the PIL image processor and the tokenizer; the
    folder's chat template where it has one (Qwen-Image-2.1's pipeline applies it)."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

    folder = Path(folder)
    processor_dir = folder / "processor"
    text_dir = processor_dir if (processor_dir / "tokenizer_config.json").is_file() else folder / "tokenizer"
    if (processor_dir / "preprocessor_config.json").is_file():  # the hub repos' layout
        images = Qwen2VLImageProcessorPil.from_pretrained(str(processor_dir))
    else:  # transformers 5's save_pretrained: one processor_config.json with the image processor's settings inside
        settings = json.loads((processor_dir / "processor_config.json").read_text())["image_processor"]
        images = Qwen2VLImageProcessorPil(**{k: v for k, v in settings.items()
                                             if k not in ("image_processor_type", "processor_class")})
    tokenizer = Qwen2Tokenizer.from_pretrained(str(text_dir))
    template = None
    if (processor_dir / "chat_template.jinja").is_file():
        template = (processor_dir / "chat_template.jinja").read_text()
    elif (processor_dir / "chat_template.json").is_file():
        template = json.loads((processor_dir / "chat_template.json").read_text()).get("chat_template")
    return pil_processor(images, tokenizer, base, template or getattr(tokenizer, "chat_template", None))


def processor_override(folder: str | Path, index: dict) -> dict:
    """``{"processor": ...}`` for ``from_pretrained`` where the pipeline's processor needs torchvision that is not
    installed (a local Qwen-Image-Edit folder), else ``{}``."""
    entry = index.get("processor")
    if not (isinstance(entry, list) and entry and entry[-1] in PIL_PROCESSORS) or not torchvision_missing():
        return {}
    processor_dir = Path(folder) / "processor"
    if not any((processor_dir / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        return {}
    return {"processor": load_pil_processor(folder, entry[-1])}
