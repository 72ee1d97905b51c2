"""What a checkpoint path holds, found from file names, safetensors headers and JSON configs alone.

Kinds: ``pipeline`` (diffusers pipeline folder), ``transformer`` (diffusers transformer folder, sharded or
not), ``state_dict`` (one file, full weights), ``peft`` (peft adapter folder), ``diffusers_lora``
(``pytorch_lora_weights.safetensors``-style, ``transformer.<module>.lora_A.weight`` keys), ``kohya``
(``lora_unet_…lora_down/lora_up/alpha``) and ``peft_wrapped`` (the whole state dict of a peft-wrapped model,
``<module>.base_layer.weight`` next to ``<module>.lora_A.<adapter>.weight``: flow_grpo's FSDP
``checkpoint-N/model.safetensors``). A trainer's checkpoint folder (``checkpoint-N/`` holding ``lora/``,
``lora_ema/``, ``lora_non_ema/``, ``transformer/``, ``model.safetensors``, a bare ``adapter_model.safetensors``
…) is resolved to one of its members. ``Checkpoint.form`` names the form in words, with who writes it.

Pipelines with two experts (Wan2.2-A14B: ``transformer`` for high noise, ``transformer_2`` for low noise):
a checkpoint says which of them it changes (``Checkpoint.experts``). Flow-Factory writes one folder per trained
expert (``checkpoint-N/transformer/``, ``checkpoint-N/transformer_2/``), resolved to one ``Checkpoint`` per
expert in ``parts``; a diffusers LoRA file prefixes each expert's keys with its attribute
(``transformer.…``, ``transformer_2.…``). The experts a checkpoint leaves out keep the base's weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError

PIPELINE_INDEX = "model_index.json"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_SIDECAR = "lora_config.json"  # DanceGRPO / Pref-GRPO: rank and alpha next to a LoRA file
FSDP_MODEL_FILE = "model.safetensors"  # flow_grpo FSDP: the whole (peft-wrapped) model state dict
BARE_ADAPTER_FILE = "adapter_model.safetensors"  # Pref-GRPO: peft weights written with save_file, no adapter_config
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
KEY_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# FSDP and activation-checkpoint wrappers insert these inside keys when a state dict is taken without
# their own state-dict hooks (FULL_STATE_DICT removes them; a plain module.state_dict() does not).
KEY_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Members of a trainer's checkpoint folder, in the order the default is chosen.
CHECKPOINT_MEMBERS = ("lora", "lora_ema", "lora_non_ema", "transformer")
# Named peft adapters that are the main one when no "default" adapter exists (flow_grpo DPO).
MAIN_ADAPTER_NAMES = ("default", "learner")

LORA_KINDS = ("peft", "diffusers_lora", "kohya", "peft_wrapped")
# ``<module>.lora_A.<adapter>.weight``: keys as a peft-wrapped module names them (saved files drop the adapter)
ADAPTER_NAMED_LORA = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")
# The pipeline attributes that hold a denoiser, in pipeline order (Wan2.2-A14B has both).
EXPERT_ATTRS = ("transformer", "transformer_2")
PARTS_KIND = "experts"  # a folder with one checkpoint per expert


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: where its weights are, what kind they are, and which adapter was taken."""

    given: Path
    path: Path
    kind: str
    files: tuple[Path, ...]
    adapter: str | None = None
    adapters: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    experts: tuple[str, ...] = ("transformer",)  # the pipeline attributes whose weights it changes
    parts: tuple[Checkpoint, ...] = ()  # one per expert, for a folder holding each expert separately

    @property
    def is_lora(self) -> bool:
        if self.parts:
            return all(part.is_lora for part in self.parts)
        return self.kind in LORA_KINDS

    def part(self, expert: str) -> Checkpoint | None:
        """The checkpoint holding ``expert``'s weights, or None where it leaves that expert to the base."""
        if expert not in self.experts:
            return None
        if not self.parts:
            return self
        return next(p for p in self.parts if expert in p.experts)

    @property
    def form(self) -> str:
        """The checkpoint form in words, naming the trainers that write it."""
        return describe_form(self)

    def identity(self) -> list:
        """Size and mtime of every weight file: enough to notice a changed checkpoint between runs."""
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]

    def describe(self) -> dict:
        out = {"path": str(self.given), "resolved": str(self.path), "kind": self.kind, "form": self.form,
               "adapter": self.adapter, "adapters": list(self.adapters), "notes": list(self.notes),
               "experts": list(self.experts)}
        if self.parts:
            out["parts"] = {p.experts[0]: {"resolved": str(p.path), "kind": p.kind, "form": p.form} for p in self.parts}
        return out


def describe_form(ckpt: Checkpoint) -> str:
    """One phrase per form: what it is and who writes it (``normscope inspect``, summary.json)."""
    name = ckpt.path.name
    sidecar = any(f.name == LORA_SIDECAR for f in ckpt.files)
    if ckpt.parts and ckpt.kind != "pipeline":
        return "one folder per expert (Flow-Factory): " + "; ".join(f"{p.experts[0]}/ {p.form}" for p in ckpt.parts)
    if ckpt.kind == "pipeline":
        return "diffusers pipeline folder (save_pretrained)"
    if ckpt.kind == "transformer":
        weights = [f for f in ckpt.files if f.suffix == ".safetensors"]
        if (ckpt.path / WEIGHTS_INDEX).is_file():
            return f"diffusers transformer folder, {len(weights)} shards + index (Flow-Factory save_pretrained)"
        return "diffusers transformer folder, single file + config.json (DanceGRPO, Flow-Factory full)"
    if ckpt.kind == "peft_wrapped":
        if not any(".base_layer." in k for k in read_shapes((ckpt.path,), "PATH")):
            return "LoRA tensors of a peft-wrapped model's state_dict (lora_A.<adapter> keys, no frozen weights)"
        return "whole peft-wrapped model state dict, base_layer + lora_A/B keys (flow_grpo FSDP model.safetensors)"
    if ckpt.kind == "state_dict":
        if name == FSDP_MODEL_FILE:
            return "full state dict, no LoRA keys (flow_grpo FSDP model.safetensors of a full fine-tune)"
        return "full state dict file"
    if ckpt.kind == "peft":
        if ckpt.path.is_dir():
            return "peft adapter folder (PeftModel.save_pretrained: flow_grpo, DiffusionNFT, AWM, Flow-Factory)"
        return "peft adapter weights without adapter_config.json" + (" + lora_config.json (Pref-GRPO)" if sidecar else "")
    if ckpt.kind == "diffusers_lora":
        if name == BARE_ADAPTER_FILE:
            return "bare adapter_model.safetensors" + (" + lora_config.json (Pref-GRPO)" if sidecar else
                                                       " without any config")
        if sidecar:
            return "diffusers LoRA file + lora_config.json (DanceGRPO)"
        return "diffusers LoRA file (save_lora_weights: dreambooth LoRA scripts)"
    if ckpt.kind == "kohya":
        return "kohya / BFL LoRA (community FLUX LoRAs)"
    return ckpt.kind


def strip_prefixes(key: str, prefixes=KEY_PREFIXES) -> str:
    """The key as the bare module names it: wrapper prefixes and FSDP/checkpoint-wrapper infixes removed."""
    for infix in KEY_INFIXES:
        key = key.replace(infix, "")
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


# ---------------------------------------------------------------- reading keys and tensors


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def load_pickle(path: Path, role: str) -> dict:
    """A pickled state dict through ``torch.load(weights_only=True)``: tensors only, no code runs."""
    import pickle

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"{role} {path} was refused by torch.load(weights_only=True) ({_one_line(exc)}): it holds more than "
            "tensors; convert it to safetensors where you trust it"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{role} {path} does not hold a flat dict of tensors: save model.state_dict() instead")
    return state


# safetensors' dtype names as torch names them; the floating ones are cast to the run's dtype, the rest refused
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                      "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def read_header(files: tuple[Path, ...], role: str) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """key (prefixes stripped) -> (file, key as stored, shape, dtype as torch names it), without reading data.

    A file safetensors cannot open (zero bytes, cut short by a failed copy, not safetensors at all) is refused
    here, before anything loads.
    """
    from safetensors import safe_open

    found: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}
    for path in files:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            for stored, tensor in load_pickle(path, role).items():
                found[strip_prefixes(stored)] = (path, stored, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                for stored in handle.keys():
                    view = handle.get_slice(stored)
                    dtype = view.get_dtype()
                    found[strip_prefixes(stored)] = (path, stored, tuple(view.get_shape()), SAFETENSORS_DTYPES.get(dtype, dtype))
        except Exception as exc:
            raise CheckpointError(
                f"{role} file {path} is not a valid safetensors file ({_one_line(exc)}): re-save it with "
                "safetensors.torch.save_file, or copy it again if the copy was cut short"
            ) from None
    return found


def read_shapes(files: tuple[Path, ...], role: str) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """key (prefixes stripped) -> (file, key as stored, shape), without reading safetensors data."""
    return {key: entry[:3] for key, entry in read_header(files, role).items()}


def read_json(path: Path, role: str, fix: str = "fix or re-save it"):
    """A JSON file a checkpoint comes with (shard index, adapter or LoRA config), refused in one line if broken."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{role} {path} is not valid JSON ({exc.msg} at line {exc.lineno}): {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{role} {path} cannot be read ({_one_line(exc)}): {fix}") from None


def read_tensors(path: Path, role: str) -> tuple[dict, dict]:
    """All tensors of one file and its safetensors header metadata (empty for pickles)."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_pickle(path, role), {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"{role} file {path} is not a valid safetensors file ({_one_line(exc)}): re-save it with "
            "safetensors.torch.save_file"
        ) from None


def lora_experts(keys) -> tuple[str, ...]:
    """The experts a diffusers-format LoRA touches, from its key prefixes (``transformer_2.`` for Wan2.2's second)."""
    found = {k.split(".", 1)[0] for k in keys}
    experts = tuple(e for e in EXPERT_ATTRS if e in found)
    return experts or ("transformer",)


def classify_keys(keys) -> str:
    """The kind of a single weights file, from its key names."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") or ".lora_down." in k for k in keys):
        return "kohya"
    # a peft-wrapped model's own state_dict(): adapter-named LoRA keys, usually with the base_layer weights too
    if any(".lora_A." in k for k in keys) and (
            any(".base_layer." in k for k in keys) or any(ADAPTER_NAMED_LORA.search(k) for k in keys)):
        return "peft_wrapped"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft" if all(k.startswith("base_model.model.") for k in keys) else "diffusers_lora"
    return "state_dict"


# ---------------------------------------------------------------- folders


def _transformer_files(folder: Path, role: str = "PATH") -> tuple[Path, ...]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _weight_map(index, role)
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{role} {index} names shard {missing[0]}, which is missing: copy every shard next to the index")
        return files
    return tuple(sorted(folder.glob("*.safetensors")))


def _weight_map(index: Path, role: str) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard file name), refused if the index is not what diffusers writes."""
    fix = "copy it again from where the transformer was saved, or re-save the transformer with save_pretrained"
    raw = read_json(index, role, fix)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{role} {index} has no weight_map of tensor names to shard files: {fix}")
    return weight_map


def _peft_weights(folder: Path) -> Path | None:
    if not (folder / PEFT_CONFIG).is_file():
        return None
    for name in PEFT_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def _adapter_options(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Named peft adapters in a peft folder: the root one ("default") and those in subfolders."""
    options = []
    if _peft_weights(folder) is not None:
        options.append((prefix or "default", folder))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _peft_weights(sub) is not None:
            options.append((f"{prefix}/{sub.name}" if prefix else sub.name, sub))
    return options


def _folder_options(folder: Path, role: str = "PATH") -> list[tuple[str, Path]]:
    """Everything in a folder that could be the tuned model, with the names ``--adapter`` takes."""
    if _peft_weights(folder) is not None:
        return _adapter_options(folder)
    options: list[tuple[str, Path]] = []
    for member in CHECKPOINT_MEMBERS:
        child = folder / member
        if not child.is_dir():
            continue
        if member == "transformer":
            if _transformer_files(child, role):
                options.append((member, child))
        else:
            options.extend(_adapter_options(child, member))
    if not options:  # named adapters only, none at the root (flow_grpo DPO: learner/ and ref/)
        options = _adapter_options(folder)
    # Single files a trainer leaves in its checkpoint folder: a diffusers LoRA, a bare peft adapter without
    # adapter_config.json (Pref-GRPO), the FSDP model state dict (flow_grpo).
    for file in (folder / DIFFUSERS_LORA_FILE, folder / BARE_ADAPTER_FILE, folder / FSDP_MODEL_FILE):
        if file.is_file() and not (file.name == BARE_ADAPTER_FILE and _peft_weights(folder) is not None):
            options.append((file.stem, file))
    return options


def _choose(options: list[tuple[str, Path]], adapter: str | None, folder: Path, role: str) -> tuple[str, Path, list[str]]:
    names = [name for name, _ in options]
    notes: list[str] = []
    if adapter is not None:
        exact = [o for o in options if o[0] == adapter]
        matches = exact or [o for o in options if o[0].split("/")[-1] == adapter]
        if len(matches) == 1:
            return matches[0][0], matches[0][1], notes
        if not matches:
            raise CheckpointError(f"--adapter {adapter} is not in {role} {folder}: it holds {', '.join(names)}")
        raise CheckpointError(f"--adapter {adapter} is ambiguous in {folder}: name one of {', '.join(n for n, _ in matches)}")
    if len(options) == 1:
        return options[0][0], options[0][1], notes
    top_level = [o for o in options if "/" not in o[0]]
    for preferred in (*MAIN_ADAPTER_NAMES, *CHECKPOINT_MEMBERS, "pytorch_lora_weights", "adapter_model", "model"):
        for name, path in top_level:
            if name == preferred:
                others = [n for n in names if n != name]
                notes.append(f"{role} {folder}: took adapter '{name}'; also there: {', '.join(others)} (choose with --adapter NAME)")
                return name, path, notes
    raise CheckpointError(f"{role} {folder} holds several adapters and none is the main one: pass --adapter with one of {', '.join(names)}")


def find_checkpoint(path: str | Path, role: str, adapter: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Resolve ``path`` to a checkpoint; ``adapter`` picks one member of a folder with several.

    What headers and JSON files can tell is checked here too (``integrity.check_checkpoint``: unreadable files,
    shard indexes, quantised dtypes, LoRA halves and configs): commands resolve their paths before they load
    the pipeline, so a broken checkpoint is refused in a second instead of failing, or being measured wrong,
    after the load.
    """
    from normscope.load.integrity import check_checkpoint

    refuse_broken_link(Path(path), role)
    ckpt = _resolve(path, role, adapter, allow_pickle)
    check_checkpoint(ckpt, role)
    return ckpt


def refuse_broken_link(path: Path, role: str) -> None:
    """A symlink that loops or points nowhere is said as such (``exists()`` alone would call it missing)."""
    import errno
    import os

    if not path.is_symlink() or path.exists():
        return
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{role} {path} is a symlink loop: point it at the checkpoint itself (ls -l shows where it leads)") from None
    raise CheckpointError(f"{role} {path} is a symlink to {os.readlink(path)}, which does not exist: copy the checkpoint there or fix the link")


def _resolve(path: str | Path, role: str, adapter: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"{role} {given} does not exist: pass a pipeline folder, a transformer folder, a LoRA or a .safetensors file")
    if given.is_file():
        if adapter is not None:
            raise CheckpointError(f"--adapter {adapter} was given but {role} {given} is a single file with no named adapters: drop --adapter")
        return _file_checkpoint(given, given, role, allow_pickle)
    if (given / PIPELINE_INDEX).is_file():
        files = _transformer_files(given / "transformer", role) if (given / "transformer").is_dir() else ()
        if not files:
            raise CheckpointError(f"{role} {given} is a pipeline folder without transformer/*.safetensors: save it with safe_serialization=True")
        second = given / EXPERT_ATTRS[1]
        if second.is_dir() and _transformer_files(second, role):
            parts = tuple(Checkpoint(given, given / e, "transformer", _transformer_files(given / e, role), experts=(e,)) for e in EXPERT_ATTRS)
            return Checkpoint(given, given, "pipeline", files + parts[1].files, experts=EXPERT_ATTRS, parts=parts)
        return Checkpoint(given, given, "pipeline", files)
    if _peft_weights(given) is None and (given / "config.json").is_file():
        files = _transformer_files(given, role)
        if files:
            return Checkpoint(given, given, "transformer", files, experts=(_expert_of(given),))
    if adapter is None and (given / EXPERT_ATTRS[1]).is_dir():
        return _parts_checkpoint(given, role, allow_pickle)
    options = _folder_options(given, role)
    if not options:
        raise CheckpointError(
            f"no checkpoint found in {role} folder {given}: looked for {PIPELINE_INDEX}, config.json with "
            f"diffusion_pytorch_model*.safetensors, {PEFT_CONFIG} with adapter_model.safetensors, "
            f"{DIFFUSERS_LORA_FILE}, {BARE_ADAPTER_FILE}, {FSDP_MODEL_FILE}, and the members "
            f"{', '.join(m + '/' for m in CHECKPOINT_MEMBERS)}"
        )
    name, chosen, notes = _choose(options, adapter, given, role)
    all_names = tuple(n for n, _ in options)
    if chosen.is_file():
        ckpt = _file_checkpoint(given, chosen, role, allow_pickle)
    elif name == "transformer" or (chosen / "config.json").is_file() and _peft_weights(chosen) is None:
        ckpt = Checkpoint(given, chosen, "transformer", _transformer_files(chosen, role))
    else:
        weights = _peft_weights(chosen)
        _refuse_pickle(weights, role, allow_pickle)
        ckpt = Checkpoint(given, chosen, "peft", (weights, chosen / PEFT_CONFIG))
    experts = ckpt.experts if ckpt.kind != "peft" else (_expert_of(given),)
    return Checkpoint(ckpt.given, ckpt.path, ckpt.kind, ckpt.files, name, all_names, tuple(notes) + ckpt.notes, experts)


def _expert_of(folder: Path) -> str:
    """A transformer folder named after an expert (Flow-Factory's ``transformer_2/``) belongs to that expert."""
    return folder.name if folder.name in EXPERT_ATTRS else EXPERT_ATTRS[0]


def _parts_checkpoint(given: Path, role: str, allow_pickle: bool) -> Checkpoint:
    """A folder with one member per expert (Flow-Factory's Wan2.2 ``transformer/`` and ``transformer_2/``)."""
    parts = []
    for expert in EXPERT_ATTRS:
        member = given / expert
        if not member.is_dir():
            continue
        if _peft_weights(member) is None and not _transformer_files(member, role):
            raise CheckpointError(
                f"{role} {member} holds neither a transformer (config.json + *.safetensors) nor a peft adapter: "
                "copy the expert's weights there, or pass the other expert's folder alone"
            )
        part = _resolve(member, role, allow_pickle=allow_pickle)
        parts.append(Checkpoint(part.given, part.path, part.kind, part.files, part.adapter, part.adapters, part.notes, (expert,)))
    kinds = {p.kind for p in parts}
    kind = kinds.pop() if len(kinds) == 1 else PARTS_KIND
    files = tuple(f for p in parts for f in p.files)
    notes = tuple(n for p in parts for n in p.notes)
    return Checkpoint(given, given, kind, files, notes=notes, experts=tuple(p.experts[0] for p in parts), parts=tuple(parts))


def _refuse_pickle(path: Path, role: str, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(
            f"{role} {path} is a pickle file, which can run code when loaded: convert it to safetensors, or pass "
            "--allow-pickle to read it with torch.load(weights_only=True)"
        )


def _file_checkpoint(given: Path, path: Path, role: str, allow_pickle: bool) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path, role, allow_pickle)
    elif suffix != ".safetensors":
        raise CheckpointError(f"{role} {path} is not a .safetensors file: pass a safetensors file or a folder")
    keys = read_shapes((path,), role)
    kind = classify_keys(keys)
    files = (path,)
    if kind in ("diffusers_lora", "peft", "peft_wrapped"):
        # rank and alpha may sit next to the weights: a trainer's lora_config.json, or an adapter_config.json
        files += tuple(path.parent / name for name in (LORA_SIDECAR, PEFT_CONFIG) if (path.parent / name).is_file())
    experts = lora_experts(keys) if kind == "diffusers_lora" else (_expert_of(path.parent),)
    return Checkpoint(given, path, kind, files, experts=experts)
