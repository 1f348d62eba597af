"""examples/train_char_lm.py (issue 10, section 5), a few steps: the same losses as SDPA in the
same model, progress on stderr, and decoding with a KV cache (q_offset) giving the text that
decoding without one gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_char_lm.py"


@pytest.fixture(scope="module")
def demo() -> Any:
    spec = importlib.util.spec_from_file_location("train_char_lm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_causal_spec_trains_like_sdpa_and_shows_progress(demo: Any,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    _, ours, _ = demo.train(demo.load_spec("causal"), 6, torch.float64, batch=4, context=32,
                            label="causal")
    _, sdpa, _ = demo.train(None, 6, torch.float64, batch=4, context=32, label="sdpa")
    assert max(abs(a - b) / abs(b) for a, b in zip(ours, sdpa)) < 1e-10
    assert ours[-1] < ours[0]  # it learns
    progress = capsys.readouterr().err
    assert "causal: step 6/6, loss" in progress and "sdpa: step 3/6" in progress


def test_decoding_with_a_kv_cache_gives_the_same_text(demo: Any) -> None:
    model, _, _ = demo.train(demo.load_spec("alibi"), 3, torch.float64, batch=4, context=32)
    plain, _ = demo.generate(model, "The ", 12, cached=False)
    cached, _ = demo.generate(model, "The ", 12, cached=True)
    assert cached == plain and len(cached) == 16
