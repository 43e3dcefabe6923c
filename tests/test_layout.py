"""The module layout the design card asks for: a small, pure `utils.py`, imports that run one way, one
copy of the algorithm (02 and 04 call `warp.warp`), 02 showing the algorithm's code, one setup cell in
01-04 (finding or fetching the code on Kaggle/Colab), and requirements.txt's tested ranges."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {
    "utils",
    "sampling",
    "config",
    "checkpoints",
    "storage",
    "runs",
    "warp",
    "evaluation",
    "offline",
    "limits",
    "geometry",
    "store_backends",
    "handoff",
}
# who may import whom: notebooks -> warp -> utils; runs, checkpoints, storage and config beside; evaluation
# (and the testbed's limits) for 02-04; the sampler uses utils' LM head (float32 logits), as the log-probs do
ALLOWED = {
    "utils": set(),
    "sampling": {"utils"},
    "checkpoints": set(),
    "storage": {"checkpoints", "store_backends"},
    "store_backends": {"checkpoints"},
    "handoff": {"storage", "checkpoints", "store_backends"},  # what a notebook checks at its end
    "runs": {"utils", "checkpoints"},
    "config": {"checkpoints", "offline"},
    "warp": {"utils", "sampling", "runs", "checkpoints", "storage", "config", "geometry"},
    "evaluation": {"utils", "sampling", "config"},
    "offline": {"utils"},
    "limits": {"utils", "checkpoints", "evaluation"},
    "geometry": {"utils"},  # the merge diagnostics merge.json and the study record
}


def imported_modules(path: Path) -> set[str]:
    """Our modules that `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_imports_run_one_way_without_cycles():
    graph = {m: imported_modules(ROOT / f"{m}.py") for m in OURS}
    for module, imports in graph.items():
        assert imports <= ALLOWED[module], f"{module} imports {sorted(imports - ALLOWED[module])}"

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    assert not [m for m in graph if reaches(m, m)], "import cycle"


def test_utils_is_pure():
    """No printing, file writing, progress bars, device guessing or Hub calls in utils.py."""
    tree = ast.parse((ROOT / "utils.py").read_text())
    calls = {
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
    }
    banned = {
        "print",
        "open",
        "tqdm",
        "torch.save",
        "torch.cuda.is_available",
        "os.replace",
        "Path.write_text",
    }
    assert not calls & banned, calls & banned
    assert not [c for c in calls if c.endswith((".write_text", ".mkdir", ".save_pretrained", ".to_csv"))]
    assert not imported_modules(ROOT / "utils.py")
    assert len((ROOT / "utils.py").read_text().splitlines()) <= 450  # the card's "small utils.py"
    assert len((ROOT / "warp.py").read_text().splitlines()) <= 300  # Algorithm 1; the bookkeeping elsewhere


def code_of(notebook: str) -> str:
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_one_copy_of_the_algorithm():
    """02 and 04 train through `warp.warp`; neither notebook re-implements a step of Algorithm 1."""
    for notebook in ("02_warp_training.ipynb", "04_mu_sweep.ipynb"):
        code = code_of(notebook)
        assert "warp.warp(" in code, notebook
        for step in ("def policy_loss", "def slerp", "def liti", "def ema_update", "def train_run"):
            assert step not in code, (notebook, step)


def test_02_shows_each_step_of_algorithm_1():
    code = code_of("02_warp_training.ipynb")
    for fn in (
        "warp.policy_loss",
        "utils.ema_update",
        "warp.train_run",
        "utils.slerp",
        "utils.liti",
        "warp.warp",
    ):
        assert any(line.startswith("show(") and fn in line for line in code.splitlines()), fn


NOTEBOOKS = (
    "01_reward_model.ipynb",
    "02_warp_training.ipynb",
    "03_generation_eval.ipynb",
    "04_mu_sweep.ipynb",
)


def setup_cell(notebook: str) -> str:
    """The first code cell of a notebook: the one that finds or fetches the code on Kaggle/Colab."""
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def run_setup_cell() -> dict:
    """Execute 01's setup cell here (the code is importable, so it only prints where) and return its
    namespace, whose functions a test can call with other roots and stand-ins."""
    namespace: dict = {}
    exec(compile(setup_cell(NOTEBOOKS[0]), "setup cell", "exec", dont_inherit=True), namespace)
    return namespace


def test_the_four_setup_cells_are_one_text():
    """One source of truth: REPO_URL, the search roots and the install are edited in one cell text."""
    cells = {nb: setup_cell(nb) for nb in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the setup cells differ; copy 01's into the others"
    assert cells[NOTEBOOKS[0]].count("REPO_URL = ") == 1 and "WARP_REPO_URL" in cells[NOTEBOOKS[0]]


def test_setup_finds_a_copy_in_a_kaggle_dataset_or_drive(tmp_path):
    find_code = run_setup_cell()["find_code"]
    kaggle, drive = tmp_path / "kaggle" / "input", tmp_path / "drive" / "MyDrive"
    assert find_code([kaggle, drive]) is None
    for folder in (kaggle / "x", kaggle / "y" / "warp-imdb-main", drive / "warp-imdb"):
        folder.mkdir(parents=True)
        (folder / "warp.py").write_text("")
    (kaggle / "x" / "requirements.txt").write_text("")
    assert find_code([kaggle, drive]) == kaggle / "x"
    (kaggle / "x" / "requirements.txt").unlink()  # a stray warp.py without the rest is not the code
    (kaggle / "y" / "warp-imdb-main" / "requirements.txt").write_text("")  # one level deeper
    assert find_code([kaggle, drive]) == kaggle / "y" / "warp-imdb-main"
    (drive / "warp-imdb" / "requirements.txt").write_text("")
    assert find_code([tmp_path / "none", drive]) == drive / "warp-imdb"


def test_setup_without_the_code_or_the_internet_says_what_to_do(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    cell = run_setup_cell()
    with pytest.raises(RuntimeError) as placeholder:
        cell["get_code"]([tmp_path], "https://github.com/YOUR-USER/warp-imdb")
    for way in ("set REPO_URL", "WARP_REPO_URL", "Kaggle add the repository as a dataset", "in Drive"):
        assert way in str(placeholder.value), way

    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cell["subprocess"] = None  # nothing may be cloned or installed
    with pytest.raises(RuntimeError, match=r"no internet .*Kaggle: Settings -> Internet -> on.*Colab: "):
        cell["get_code"]([tmp_path], "https://github.com/me/warp-imdb")


def test_setup_upgrades_the_hf_libraries_together_and_never_torch(tmp_path, monkeypatch):
    """From a Kaggle dataset: no clone; pip upgrades the six HF libraries at once within requirements.txt
    (only-if-needed, so torch stays), then installs the rest; the copy goes on the import path."""
    import sys

    cell = run_setup_cell()
    code = tmp_path / "input" / "warp-imdb"
    code.mkdir(parents=True)
    (code / "warp.py").write_text("")
    (code / "requirements.txt").write_text("torch>=2.1\n")
    calls = []
    cell.update(require_internet=lambda: None, pip_install=lambda *args: calls.append(args), subprocess=None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cell["get_code"]([tmp_path / "input"], "https://github.com/YOUR-USER/warp-imdb") == code
    upgrade, rest = calls
    assert upgrade[:4] == ("--upgrade", "--upgrade-strategy", "only-if-needed", "-c")
    assert set(upgrade[5:]) == {
        "transformers",
        "accelerate",
        "peft",
        "datasets",
        "huggingface_hub",
        "tokenizers",
    }
    assert "torch" not in " ".join(upgrade) and rest == ("-r", str(code / "requirements.txt"))
    assert sys.path[0] == str(code.resolve())


def test_requirements_hold_tested_ranges_and_the_setup_cell_upgrades_all_hf_libraries():
    """Every runtime package has the lower bound CI's lowest job installs; the HF libraries also an upper
    bound (a major or minor release not tested yet could break what the notebooks call), and the setup
    cell upgrades exactly those together (an old peft beside a new transformers fails to import)."""
    import re

    bounds = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", line).groups()
            bounds[name] = spec
    assert all(">=" in spec for spec in bounds.values()), bounds
    hf = {"transformers", "accelerate", "peft", "datasets", "huggingface_hub", "tokenizers"}
    assert hf <= set(bounds) and all("<" in bounds[name].replace("<=", "") for name in hf)
    assert "<" not in bounds["torch"]  # Kaggle's and Colab's CUDA builds stay
    assert re.search(r"peft>=0\.(1[89]|2\d)", "peft" + bounds["peft"])  # 0.17 breaks with transformers 5
    cell = setup_cell(NOTEBOOKS[0])
    assert set(re.search(r"HF_LIBS = \[(.*)\]", cell).group(1).replace('"', "").split(", ")) == hf
