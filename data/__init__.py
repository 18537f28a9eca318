"""ldot data: shard schema and validation, converters, synthetic demo data, the streaming loader."""

from ldot.data.errors import DataError
from ldot.data.schema import SCHEMA_VERSION

__all__ = ["DataError", "SCHEMA_VERSION", "TrainLoader", "EvalSplit", "load_eval_split"]


def __getattr__(name):
    # The loader pulls in torch and a tokenizer stack; `ldot data inspect` should not pay for it.
    if name in ("TrainLoader", "EvalSplit", "load_eval_split"):
        from ldot.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
