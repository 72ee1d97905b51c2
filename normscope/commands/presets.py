"""The presets job: the Python API behind ``normscope presets``.

    from normscope.commands.presets import PresetsConfig, list_presets
    rows = list_presets(PresetsConfig(family="qwen-image"))

Each row is a trainer's evaluation setting that ``--preset NAME`` applies (steps, guidance and the
pipeline argument it goes to, size), with its source. Nothing is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from normscope.load.families import FAMILIES, family_named


@dataclass(kw_only=True)
class PresetsConfig:
    """``normscope presets``: ``family`` limits the list to one family (None: all)."""

    family: str | None = None

    def __post_init__(self) -> None:
        if self.family is not None:
            family_named(self.family)  # an unknown family is refused with the list of families


def list_presets(config: PresetsConfig | None = None) -> list[dict]:
    """Every preset (of one family, if asked) as a dict: name, family, steps, guidance, argument, size, source."""
    config = config or PresetsConfig()
    rows = []
    for family in FAMILIES:
        if config.family is not None and family.name != config.family:
            continue
        for preset in family.presets:
            row = asdict(preset)
            row["pipelines"] = ", ".join(family.pipeline_classes)
            rows.append(row)
    return rows
