"""The lever study's pieces: the held-out genres beyond Wikipedia, and the script's fail-fast path."""
import subprocess
import sys
from pathlib import Path

import pytest

from replaceme_jax.data.calibration import load_calibration_texts
from replaceme_jax.data.corpora import heldout_fiction_texts, heldout_science_texts, heldout_wikipedia_texts
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.perplexity import held_out_genres

ROOT = Path(__file__).resolve().parents[1]


def test_fiction_corpus_is_real_narrative_and_disjoint_from_calibration():
    texts = heldout_fiction_texts()
    assert len(texts) == 1000 and len(heldout_fiction_texts(None)) == 5153
    assert all(len(t.split()) >= 20 for t in texts)
    assert len(set(texts)) > 990  # passages, not one text repeated
    calibration = set(load_calibration_texts("boolq", num_samples=None))
    assert not calibration & set(texts) and not set(heldout_wikipedia_texts()) & set(texts)


def test_science_corpus_is_real_prose_and_disjoint_from_calibration():
    texts = heldout_science_texts()
    assert len(texts) == 887 and len(set(texts)) == 887
    assert sum(len(t.split()) for t in texts) > 60_000
    assert any("nucleotides" in t for t in texts)
    calibration = set(load_calibration_texts("boolq", num_samples=None))
    assert not calibration & set(texts) and not set(heldout_wikipedia_texts()) & set(texts)


def test_unknown_genre_names_the_choices():
    with pytest.raises(ReplaceMeError, match=r"unknown held-out genre.*'poetry'.*wikipedia, fiction, science"):
        held_out_genres(None, genres=("wikipedia", "poetry"))


def test_study_script_bad_cut_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_levers.py"), "--cut=20-12",
                           f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "20-12" in errors[0] and not (tmp_path / "out").exists()
