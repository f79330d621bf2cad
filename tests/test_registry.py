"""Issue 16 items 4 and 5: methods stand alone (a method module imports shared modules only), one
registry whose keys are exactly the options of conf/<group>/, and each method's and noise model's
defaults live once (the Config dataclass; conf/<group>/<key>.yaml adds comments and `name`/`kind`)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT, compose_config
from omegaconf import OmegaConf

from pruning import methods, noise, registry
from pruning.hydra_conf import method_node, noise_node

METHODS_DIR = ROOT / "pruning" / "methods"
SHARED_IN_METHODS = {"pruning.methods.base"}  # the package's shared vocabulary (PruningProblem, ...)


def plain(cfg: object) -> dict:
    """A dataclass as plain values (tuples as lists, as after a trip through YAML)."""
    return OmegaConf.to_container(OmegaConf.create(dataclasses.asdict(cfg)))


def imported_modules(source: str, package: str = "pruning.methods") -> set[str]:
    """Every module a source file imports (`from pruning.methods import lr` counts as pruning.methods.lr)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pruning.methods import lr` imports the module pruning.methods.lr
            out |= {f"{base}.{alias.name}" for alias in node.names} if base == package else {base}
    return out


def method_imports(path: Path) -> set[str]:
    """The method modules (and package internals other than the shared ones) a file imports."""
    return {m for m in imported_modules(path.read_text())
            if (m == "pruning.methods" or m.startswith("pruning.methods.")) and m not in SHARED_IN_METHODS}


def test_the_import_check_catches_a_method_importing_another(tmp_path):
    for src in ("from pruning.methods.lr import solve_info\n", "from pruning.methods import woodfisher\n",
                "import pruning.methods.grda\n", "from .sdprun import find_groups\n"):
        path = tmp_path / "m.py"
        path.write_text(src)
        assert method_imports(path), src
    (tmp_path / "ok.py").write_text("from pruning.methods.base import PruneResult\nfrom pruning import fisher\n")
    assert method_imports(tmp_path / "ok.py") == set()


@pytest.mark.parametrize("path", sorted(METHODS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_method_modules_import_only_shared_modules(path):
    bad = method_imports(path)
    assert not bad, f"{path.name} imports {sorted(bad)}: move what it needs to a shared module"


def test_every_method_module_is_registered():
    modules = {p.stem for p in METHODS_DIR.glob("*.py")} - {"__init__", "base"}
    assert modules == set(registry.METHODS)


@pytest.mark.parametrize(("group", "table"), [("method", registry.METHODS), ("noise", registry.NOISE),
                                              ("model", registry.MODELS), ("dataset", registry.DATASETS)])
def test_registry_keys_are_the_config_options(group, table):
    assert set(table) == {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    doc = registry.__doc__ or ""
    for key in table:  # the docstring lists every key
        assert f"\n  {key} " in doc, key


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_method_spec_resolves_to_its_contract(name):
    spec = registry.METHODS[name]
    config = spec.config.load()
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
    assert callable(config().validate)
    entry = spec.entry.load()
    assert entry.__name__ == ("prune" if spec.kind == "weights" else "run") and callable(entry)
    assert methods.get(name).__name__ == f"pruning.methods.{name}"
    assert methods.kind(name) == spec.kind and methods.needs_gradients(name) == spec.needs_gradients
    assert spec.kind == "weights" or not spec.needs_gradients  # train-time methods never get G


def test_noise_models_build_from_the_registry():
    for kind in noise.available():
        assert noise.build({"kind": kind}).kind == kind


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_method_defaults_live_in_the_dataclass(name):
    """The composed `method` node is the dataclass's defaults (plus `name`), and the YAML sets no value."""
    yaml = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
    assert set(yaml) == {"defaults", "name"} and yaml.name == name
    composed = OmegaConf.to_container(compose_config([f"method={name}"]).method)
    assert composed == OmegaConf.to_container(OmegaConf.create(method_node(name)))
    assert plain(methods.make_config(name, composed)) == plain(methods.make_config(name, {}))


@pytest.mark.parametrize("kind", list(registry.NOISE))
def test_noise_defaults_live_in_the_dataclass(kind):
    yaml = OmegaConf.load(CONF_DIR / "noise" / f"{kind}.yaml")
    assert set(yaml) == {"defaults", "kind"} and yaml.kind == kind
    composed = OmegaConf.to_container(compose_config([f"noise={kind}"]).noise)
    assert composed == OmegaConf.to_container(OmegaConf.create(noise_node(kind)))
    assert noise.build(composed).record() == noise.build({"kind": kind}).record()


def test_swap_shares_lr_solver_keys():
    from pruning.sparse_regression import SolverConfig

    solver = {f.name for f in dataclasses.fields(SolverConfig)}
    for name in ("lr", "swap"):
        assert solver <= set(compose_config([f"method={name}"]).method)
    assert "max_iter" not in (CONF_DIR / "method" / "swap.yaml").read_text().replace("# ", "")


def test_method_keys_override_without_plus():
    cfg = compose_config(["method=swap", "method.max_iter=50", "method.finish=backsolve"])
    assert methods.make_config("swap", cfg.method).max_iter == 50
    assert methods.make_config("swap", cfg.method).finish == "backsolve"
