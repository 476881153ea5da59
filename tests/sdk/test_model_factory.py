"""--model MODULE:CALLABLE: found in the current directory, arguments parsed, every failure one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdk.model_factory import ModelLoadError, import_model_factory, load_model, parse_model_args

NET = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, features=6, hidden=8, classes=3):
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.base(x))

def not_a_model():
    return 42

class Empty(torch.nn.Module):
    def forward(self, x):
        return x

VALUE = 3
'''


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    name = f"usermodels_{os.getpid()}_{abs(hash(tmp_path)) % 10**8}"  # a fresh module name per test: no sys.modules reuse
    (tmp_path / f"{name}.py").write_text(NET)
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path / f"{name}.py"


def test_model_is_imported_from_the_current_directory_with_arguments(model_dir: Path) -> None:
    model = load_model(f"{model_dir.stem}:Net", ["hidden=5", "classes=4"])
    assert dict(model.named_parameters())["head.weight"].shape == (4, 5)
    assert str(model_dir.parent) not in sys.path  # the working directory is searched, not left on the path


def test_model_is_imported_from_a_file_path(model_dir: Path) -> None:
    model = load_model(f"{model_dir.name}:Net")
    assert dict(model.named_parameters())["base.0.weight"].shape == (8, 6)


def test_model_arguments_are_literals_or_strings() -> None:
    assert parse_model_args(["a=3", "b=(1,2)", "c=hello", "d='x'", "e=1.5e-3"]) == {"a": 3, "b": (1, 2), "c": "hello", "d": "x",
                                                                                     "e": 1.5e-3}
    for bad in ("noequals", "=3", "1x=2"):
        with pytest.raises(ModelLoadError, match="KEY=VALUE"):
            parse_model_args([bad])


@pytest.mark.parametrize("spec,args,expected", [
    ("nocolon", (), "expected MODULE:CALLABLE"),
    ("no_such_module_xyz:Net", (), "no module 'no_such_module_xyz' in the current directory"),
    ("{mod}:Nett", (), "has no attribute 'Nett'"),
    ("{mod}:VALUE", (), "VALUE is not callable"),
    ("{mod}:Net", ("hiden=3",), "TypeError: .*unexpected keyword argument 'hiden'"),
    ("{mod}:not_a_model", (), "returned int, not a torch.nn.Module"),
    ("{mod}:Empty", (), "has no parameters"),
    ("broken:Net", (), "importing broken failed: RuntimeError: boom at import"),
    ("missing.py:Net", (), "model file missing.py does not exist"),
])
def test_model_loading_failures_are_one_line(model_dir: Path, spec: str, args: tuple[str, ...], expected: str) -> None:
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model(spec.format(mod=model_dir.stem), args)
    assert "\n" not in str(info.value)


def test_import_model_factory_returns_the_callable(model_dir: Path) -> None:
    factory = import_model_factory(f"{model_dir.stem}:Net")
    assert factory.__name__ == "Net"


def _fedge() -> str:
    script = Path(sys.executable).parent / "fedge"
    assert script.is_file(), f"the fedge console script is not installed next to {sys.executable}"
    return str(script)


def test_fedge_bundle_build_finds_a_model_in_the_working_directory(tmp_path: Path) -> None:
    """The console script (not python -m, which would put the directory on sys.path itself), no PYTHONPATH."""
    (tmp_path / "mymodels.py").write_text(NET)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([_fedge(), "keys", "generate", "--out", "fleet"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=120)
    key = tmp_path / "fleet"
    done = subprocess.run([_fedge(), "bundle", "build", "--model", "mymodels:Net", "--model-arg", "hidden=4", "--input-shape", "6",
                           "--personal", "head", "--mode", "fedsim", "--artifacts", "portable", "--key", key.name, "--name", "m",
                           "-o", "m.fedge"],  # one kind, one step graph: what is tested is where the model is found
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.fedge").stat().st_size > 0
    bad = subprocess.run([_fedge(), "bundle", "build", "--model", "mymodels:Nope", "--input-shape", "6", "--mode", "fedavg",
                          "--key", key.name, "--name", "m", "-o", "m2.fedge"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "mymodels has no attribute 'Nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
