"""Pipelines normscope builds itself, apart from the measurement core: tiny seeded test pipelines built
from configs (``tiny``) and the bundled digits demo model (``digits``)."""
