"""The Colab notebooks run top to bottom, headless, with a few steps; docs and citation parse.

Each notebook executes in a fresh IPython kernel (nbclient) whose working directory is the
repository root and whose environment sets `RL_JAX_NOTEBOOK_STEPS` (the small-steps setting)
and `RL_JAX_NOTEBOOK_OUT`. The kernel talks over the IPC transport and its stdout/stderr go to a
log file, so nothing it prints can land on pytest's summary line.
"""

import base64
import json
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client import KernelManager  # noqa: E402 (after the importorskips)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMALL_STEPS = 4
# Figures each notebook must show (image/png outputs) and files it must write under its OUT dir.
EXPECTED = {
    "01_quickstart.ipynb": {"figures": 1, "files": ["01_quickstart/curves.png"]},
    "02_loss_kernels.ipynb": {"figures": 5, "files": []},
    "03_off_policy.ipynb": {"figures": 2, "files": ["03_off_policy/off_policy.png"]},
}
_REPO_URL = re.compile(r'REPO_URL = "([^"]+)"')


def _code(nb) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def _execute(path: pathlib.Path, tmp_path: pathlib.Path):
    """Runs the notebook in a fresh kernel; returns (executed notebook, kernel log text)."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.update({
        "RL_JAX_NOTEBOOK_STEPS": str(SMALL_STEPS),
        "RL_JAX_NOTEBOOK_OUT": str(tmp_path / "out"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })  # fmt: skip
    # Share compiled programs with the rest of the suite (tests/conftest.py's cache).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    log_path = tmp_path / "kernel.log"
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel-ipc"))
    client = nbclient.NotebookClient(
        nb, km=km, timeout=600, resources={"metadata": {"path": str(ROOT)}}
    )
    with open(log_path, "wb") as log:
        try:
            client.execute(env=env, stdout=log, stderr=log)
        finally:
            if client.kc is not None:
                client.kc.stop_channels()
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    return nb, log_path.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_headless(path, tmp_path):
    try:
        nb, _ = _execute(path, tmp_path)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{str(err)[-3000:]}")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    expected = EXPECTED[path.name]
    assert len(figures) >= expected["figures"], f"{path.name}: {len(figures)} figures"
    for figure in figures:
        assert base64.b64decode(figure["data"]["image/png"]).startswith(b"\x89PNG")
    for name in expected["files"]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Traceback" not in text
    assert f"working directory: {ROOT}" in text  # the setup cell found the checkout, no install


def test_every_notebook_is_listed_and_saved_without_outputs():
    assert sorted(EXPECTED) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_notebooks_share_one_setup_cell_and_repo_url():
    setups, urls = set(), set()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        setup = next(c.source for c in nb.cells if c.cell_type == "code")
        assert 'find_spec("rl_jax") is None' in setup  # installs only where rl_jax is missing
        assert "RL_JAX_NOTEBOOK_STEPS" in _code(nb)
        setups.add(setup)
        urls.update(_REPO_URL.findall(setup))
    assert len(setups) == 1 and len(urls) == 1
    (url,) = urls
    assert url.startswith("https://github.com/")
    # A Colab badge in the README must point into the same repository as the install cell.
    readme = (ROOT / "README.md").read_text()
    for repo in re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/", readme):
        assert f"https://github.com/{repo}" == url, (repo, url)


def test_algorithms_doc_covers_every_preset_and_names_real_functions():
    import importlib

    from rl_jax import algorithms

    doc = (ROOT / "docs" / "algorithms.md").read_text()
    for name in algorithms.names():
        assert f"`{name}`" in doc, name
    references = re.findall(r"`(rl_jax/[a-z_]+\.py):([A-Za-z_.]+)`", doc)
    assert len(references) >= 10
    for file, qualname in references:
        target = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        for part in qualname.split("."):
            target = getattr(target, part)  # AttributeError names a stale reference


def test_citation_cff_parses_and_cites_the_paper():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == "0.1.0" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm" in paper["title"]
    assert [a["family-names"] for a in paper["authors"]] == [
        "Yao", "Chen", "Sun", "Chen", "Zhang", "Pan", "Li", "Ding",
    ]  # fmt: skip
    assert paper["year"] == 2025
    assert "2509.24203" in json.dumps(paper)
