"""Shared fixtures: small models and the real phi tokenizer, all made offline."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def phi_tokenizer():
    from phikit.tokenizer import build_phi_tokenizer
    return build_phi_tokenizer()


@pytest.fixture(scope="session")
def tiny_phi_checkpoint(tmp_path_factory, phi_tokenizer):
    """A random tiny model with the real phi tokenizer and 51200-row embedding, saved in the HF-native layout."""
    import phikit
    from phikit import build_model, get_config
    model = build_model(get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(phi_tokenizer)), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-phi"
    phikit.save(model, phi_tokenizer, path)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it costs a lot: a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
