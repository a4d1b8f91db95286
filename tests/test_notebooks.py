"""The Colab notebooks run top to bottom (small setting, REPLACEME_SMALL=1) and fail on any error."""
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "colabs"


def test_notebooks_open_with_the_colab_install_cell():
    nbformat = pytest.importorskip("nbformat")
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "code" and "pip" in first.source and "--no-deps" in first.source, path.name
        assert "find_spec" in first.source, f"{path.name}: the install cell must skip installed packages"
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: stored outputs"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ablations.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    monkeypatch.setenv("REPLACEME_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is this interpreter (jupyter_client swaps the spec's "python" for sys.executable);
    # outputs land in tmp_path, the kernel's working directory.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
