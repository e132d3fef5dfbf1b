"""Shared fixtures. Every test runs offline on CPU; shared corpora are optional (tests skip without them)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shared_data_dir() -> Path:
    """../shared/data beside the repo (or $MINIMIND_SHARED_DATA)."""
    env = os.environ.get("MINIMIND_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = shared_data_dir()
    if not (p / "SOURCES.md").is_file():
        pytest.skip(f"shared corpora not found at {p} (set MINIMIND_SHARED_DATA)")
    return p


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests use tiny tensors: on 2 shared cores, one intra-op thread is many times faster than two."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    """Keep pre-tokenized caches out of the user's home directory."""
    os.environ["MINIMIND_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from minimind import DEFAULT_TOKENIZER
    from minimind.tokenizer import Tokenizer
    return Tokenizer.load(DEFAULT_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """The embedded default dataset, tiny variant: {'pretrain': path, 'sft': path, 'dpo': path}."""
    sys.path.insert(0, str(ROOT / "dataset"))
    from build_default import build
    out = tmp_path_factory.mktemp("tiny-data")
    paths = build(str(out), seed=0, tiny=True)
    return {k: str(v) for k, v in paths.items()}


def run_script(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would; returns the completed process (never raises on failure)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
