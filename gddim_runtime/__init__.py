"""gddim_runtime: a lean torch sampler that consumes gddim-toolkit coefficient tables.

Imports torch, numpy and safetensors only. Heavy submodules load on first use, so that
``derive`` can share the format constant without importing torch.
"""

from ._format import FORMAT_VERSION, TableError, read_table

__all__ = ["FORMAT_VERSION", "TableError", "read_table"]
