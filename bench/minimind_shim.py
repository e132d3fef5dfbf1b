"""Running MiniMind's own code (a git-ignored clone) beside ours: stand-ins for what it imports but never needs here.

MiniMind's dataset code imports the `datasets` package and calls load_dataset('json', data_files=..., split=...)
on JSON-lines files; its other datasets use Features/Sequence/Value only as schema hints. Where `datasets` is not
installed, stub_datasets() puts a plain JSON-lines reader in its place, so MiniMind's code runs unchanged.
"""
import json
import sys
import types


def stub_datasets() -> None:
    """Install the stand-in `datasets` module unless the real package is importable."""
    try:
        import datasets  # noqa: F401
        return
    except ImportError:
        pass

    def load_dataset(kind, data_files, split="train", **kw):
        assert kind == "json", kind
        with open(data_files, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def schema(*a, **kw):
        return None
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=load_dataset, Features=schema, Sequence=schema,
                                                    Value=schema)
