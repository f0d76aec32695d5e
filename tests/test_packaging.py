"""The distribution's shape: extras against imports, pins, the edgefl.* mapping, the wheel.

Each role's extra must install what the role imports: the imports are read from the source
(module-level and inside functions, following edgefl's own modules to what they import in
turn) and each third-party one must come from the base dependencies or the role's extras.
scripts/wheel_check.py installs the server and device extras alone from the built wheel
and runs them; these tests are the fast half of that.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PROJECT["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match is not None
    return match.group(0).lower()


def _closure(extra: str) -> list[str]:
    """Requirements of an extra plus the base, following edgefl[...] self-references."""
    extras = PROJECT["project"]["optional-dependencies"]
    seen: list[str] = list(PROJECT["project"]["dependencies"])
    todo = [extra]
    while todo:
        for req in extras[todo.pop()]:
            nested = re.fullmatch(r"edgefl\[(.+)\]", req)
            if nested:
                todo += nested.group(1).split(",")
            else:
                seen.append(req)
    return seen


def test_device_extra_has_no_torch_and_has_the_device_stack() -> None:
    names = {_name(r) for r in _closure("device")}
    assert not names & {"torch", "opacus", "flwr", "litert-torch", "ai-edge-quantizer"}
    assert {"numpy", "ai-edge-litert", "paho-mqtt", "grpcio", "cryptography", "pydantic"} <= names


def test_torch_and_flwr_are_pinned_wherever_they_appear() -> None:
    for extra in PROJECT["project"]["optional-dependencies"]:
        for req in _closure(extra):
            if _name(req) == "torch":
                assert req == "torch==2.13.0", (extra, req)
            if _name(req) == "flwr":
                assert req.endswith("==1.41.0"), (extra, req)


def test_all_extra_covers_every_role() -> None:
    names = {_name(r) for r in _closure("all")}
    assert {"torch", "opacus", "flwr", "litert-torch", "ai-edge-quantizer", "sqlalchemy"} <= names
    assert {"onnxruntime", "onnx", "onnxscript"} <= names


def test_the_jetson_extra_adds_onnxruntime_to_the_device_stack_and_the_pi_stays_small() -> None:
    device = {_name(r) for r in _closure("device")}
    jetson = {_name(r) for r in _closure("jetson")}
    assert device < jetson
    assert jetson - device == {"onnxruntime"}
    assert "onnxruntime" not in device
    # One pin for onnxruntime wherever it appears (the toolkit verifies on the same one).
    pins = {r for extra in ("jetson", "quantize") for r in _closure(extra)}
    assert {r for r in pins if _name(r) == "onnxruntime"} == {"onnxruntime==1.32.0"}


@pytest.mark.parametrize(
    "module",
    [
        "edgefl.server",
        "edgefl.edge_agent",
        "edgefl.edge_agent.runtimes",
        "edgefl.proto",
        "edgefl.quantize",
        "edgefl.quantize.recipes",
        "edgefl.simulations",
    ],
)
def test_folders_install_under_the_edgefl_namespace(module: str) -> None:
    folder = PROJECT["tool"]["setuptools"]["package-dir"][".".join(module.split(".")[:2])]
    imported = importlib.import_module(module)
    assert imported.__file__ is not None
    assert Path(imported.__file__).resolve().is_relative_to(ROOT / folder)


def test_cli_help_does_not_import_torch() -> None:
    """A device without torch must be able to run the CLI."""
    code = "import sys, edgefl.cli; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == "False"


def test_server_extra_installs_what_its_privacy_check_imports() -> None:
    # The ServerApp checks reported ε with edgefl.privacy.epsilon_of, which uses Opacus'
    # accountant: without opacus in the extra, `pip install '.[server]'` fails at run time.
    source = (ROOT / "core" / "privacy.py").read_text()
    assert "from opacus" in source
    assert "opacus" in {_name(r) for r in _closure("server")}


# --- extras against imports -------------------------------------------------------------

# Import names whose distribution is named otherwise (any other: the same name, with "_"
# read as "-").
DISTRIBUTION_OF = {
    "yaml": "pyyaml",
    "paho": "paho-mqtt",
    "google.protobuf": "protobuf",
    "sklearn": "scikit-learn",
    "tomli_w": "tomli-w",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "psycopg2": "psycopg2-binary",
}


@dataclass(frozen=True)
class Role:
    """Who installs which extras, and which of edgefl's modules they run.

    Attributes:
        extras: What the role installs beside the base dependencies.
        packages: The modules the role runs: these packages and everything below them.
        leave_out: Modules under ``packages`` that belong to another role.
        features: Third-party imports of an optional feature, each with the extra the docs
            tell its user to add (the test checks that extra provides it).
    """

    extras: tuple[str, ...]
    packages: tuple[str, ...]
    leave_out: tuple[str, ...] = ()
    features: tuple[tuple[str, str], ...] = ()


ROLES = {
    "server": Role(
        ("server",),
        ("edgefl.server",),
        # The in-process simulation is the sim role's composition root.
        leave_out=("edgefl.server.fl.simulation",),
        features=(
            # `server release` builds variants with the model toolkit: `edgefl[server,quantize]`.
            ("ai_edge_quantizer", "quantize"),
            ("litert_torch", "quantize"),
            ("matplotlib", "quantize"),
            # ... and the ONNX variant, verified on onnxruntime (the exporter's onnxscript
            # is imported under a guard that names the extra).
            ("onnxruntime", "quantize"),
            # The package's __init__ exposes run_simulation, which starts Ray itself (a
            # start that timed out is retried): `edgefl[sim]`.
            ("ray", "sim"),
        ),
    ),
    "device": Role(
        ("device",),
        # The runtimes' backends are imported by key (importlib), so they are named here.
        ("edgefl.edge_agent", "edgefl.runtimes"),
        # Training (the ClientApp, DP-SGD) is the training role.
        leave_out=("edgefl.edge_agent.fl",),
        features=(
            # A SuperNode's app trust check runs only for a device that trains.
            ("flwr", "training"),
            # The device's privacy plan and lifetime accountant (the training: section).
            ("opacus", "training"),
            # The dataset-replay source: `edgefl[device,datasets]`.
            ("sklearn", "datasets"),
            ("mlxtend", "datasets"),
            # The legacy runtime lives in its own numpy<2 venv.
            ("tflite_runtime", "tflite"),
            # ONNX Runtime (a release's onnx variant) is the Jetson's: `edgefl[jetson]`.
            ("onnxruntime", "jetson"),
        ),
    ),
    # A Jetson-class device: the device stack and ONNX Runtime.
    "jetson device": Role(
        ("jetson",),
        ("edgefl.edge_agent", "edgefl.runtimes"),
        leave_out=("edgefl.edge_agent.fl",),
        features=(
            ("flwr", "training"),
            ("opacus", "training"),
            ("sklearn", "datasets"),
            ("mlxtend", "datasets"),
            ("tflite_runtime", "tflite"),
        ),
    ),
    "training device": Role(
        ("device", "training"),
        ("edgefl.edge_agent", "edgefl.runtimes"),
        features=(("tflite_runtime", "tflite"), ("onnxruntime", "jetson")),
    ),
    "toolkit": Role(("quantize",), ("edgefl.quantize",)),
    "simulation": Role(("sim",), ("edgefl.simulations", "edgefl.server.fl.simulation")),
}


def _module_files() -> dict[str, Path]:
    """Every edgefl module and the file it is in, by the package-dir mapping."""
    mapped = {(ROOT / folder).resolve() for folder in PACKAGE_DIRS.values()}
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = (ROOT / folder).resolve()
        for path in base.rglob("*.py"):
            if any(p in mapped for p in path.parents if p != base and p.is_relative_to(base)):
                continue  # a folder mapped to a package of its own
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _module_files()


@dataclass(frozen=True)
class Import:
    """One import statement's module, as written or resolved from a relative import."""

    name: str
    lazy: bool  # inside a function: runs only when the function is called
    optional: bool  # inside try/except ImportError: the code copes without it


def _catches_import_error(handlers: list[ast.ExceptHandler]) -> bool:
    for handler in handlers:
        caught = handler.type
        names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        if any(
            isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"}
            for n in names
        ):
            return True
    return False


def _imports(module: str) -> list[Import]:
    """The imports of one module; ``if TYPE_CHECKING:`` blocks do not run, so they are out."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, optional: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, lazy, optional)
        elif isinstance(node, ast.Try):
            guarded = optional or _catches_import_error(node.handlers)
            for child in node.body:
                visit(child, lazy, guarded)
            for child in [*node.orelse, *node.finalbody]:
                visit(child, lazy, optional)
            for handler in node.handlers:
                for child in handler.body:
                    visit(child, lazy, optional)
        elif isinstance(node, ast.Import):
            found.extend(Import(alias.name, lazy, optional) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append(Import(name, lazy, optional))
            # `from package import module` imports the module.
            found.extend(Import(f"{name}.{alias.name}", lazy, optional) for alias in node.names)
        else:
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for sub in ast.iter_child_nodes(node):
                visit(sub, inner, optional)

    for statement in ast.parse(path.read_text(encoding="utf-8")).body:
        visit(statement, False, False)
    return found


def _third_party_name(name: str) -> str | None:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in {"__future__", "edgefl"}:
        return None
    return "google.protobuf" if name.startswith("google.protobuf") else top


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _role_imports(role: Role) -> dict[str, list[str]]:
    """Third-party imports a role runs (optional ones left out), each with where it is.

    From the role's modules, edgefl's own imports are followed, with each package's
    ``__init__`` on the way; the CLI root (``edgefl.cli``) is a composition root that
    mounts every role's commands, so it is not followed.
    """
    todo = [m for m in MODULES if _under(m, role.packages) and not _under(m, role.leave_out)]
    seen: set[str] = set()
    third: dict[str, list[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imp in _imports(module):
            if imp.name.split(".")[0] == "edgefl":
                if imp.name in MODULES and imp.name != "edgefl.cli":
                    todo.append(imp.name)
                continue
            name = _third_party_name(imp.name)
            if name is not None and not imp.optional:
                third.setdefault(name, []).append(module)
    return third


def _distribution(import_name: str) -> str:
    return DISTRIBUTION_OF.get(import_name, import_name).replace("_", "-").lower()


def _provided(*extras: str) -> set[str]:
    return {_name(r).replace("_", "-") for extra in extras for r in _closure(extra)}


@pytest.mark.parametrize("role_name", sorted(ROLES))
def test_each_extra_installs_what_its_role_imports(role_name: str) -> None:
    role = ROLES[role_name]
    features = dict(role.features)
    provided = _provided(*role.extras)
    missing = {}
    for name, where in sorted(_role_imports(role).items()):
        dist = _distribution(name)
        if dist in provided:
            continue
        if name in features and dist in _provided(features[name]):
            continue
        missing[name] = sorted(set(where))[:3]
    assert not missing, (
        f"the {role_name} role imports these, but base + {list(role.extras)} do not install "
        f"them (import -> modules): {missing}"
    )


@pytest.mark.parametrize("role_name", sorted(r for r in ROLES if ROLES[r].features))
def test_optional_features_are_still_imported(role_name: str) -> None:
    """A feature entry whose import went away must go too (or it hides a future gap)."""
    role = ROLES[role_name]
    imported = _role_imports(role)
    stale = [name for name, _ in role.features if name not in imported]
    assert not stale, f"{role_name}: features no module imports any more: {stale}"


def test_the_cli_root_imports_only_base_dependencies_at_start() -> None:
    """`edgefl` on any role's install: the sub-apps import their stacks inside commands."""
    base = {_name(r).replace("_", "-") for r in PROJECT["project"]["dependencies"]}
    todo, seen = ["edgefl.cli"], set()
    heavy: dict[str, list[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imp in _imports(module):
            if imp.lazy or imp.optional:
                continue
            if imp.name.split(".")[0] == "edgefl":
                todo += [imp.name] if imp.name in MODULES else []
            elif (name := _third_party_name(imp.name)) and _distribution(name) not in base:
                heavy.setdefault(name, []).append(module)
    assert not heavy, f"imported when `edgefl` starts, not a base dependency: {heavy}"


def test_the_import_walk_sees_lazy_relative_and_guarded_imports() -> None:
    imports = {i.name: i for i in _imports("edgefl.privacy")}
    assert imports["opacus.accountants.analysis"].lazy
    runtimes = {i.name for i in _imports("edgefl.runtimes")}
    assert "edgefl.runtimes.base" in runtimes
    # The server's privacy check reaches Opacus through the shared layer.
    assert "edgefl.privacy" in _role_imports(ROLES["server"])["opacus"]


# --- the wheel --------------------------------------------------------------------------


def _package_folders() -> Iterator[tuple[str, Path]]:
    """Every folder below a mapped one that holds a file, as the package it installs as."""
    mapped = {(ROOT / folder).resolve() for folder in PACKAGE_DIRS.values()}
    for package, folder in PACKAGE_DIRS.items():
        base = (ROOT / folder).resolve()
        for path in sorted([base, *(p for p in base.rglob("*") if p.is_dir())]):
            if path.name == "__pycache__" or (path != base and path in mapped):
                continue
            if any(p in mapped for p in path.parents if p != base and p.is_relative_to(base)):
                continue
            if not any(f.is_file() for f in path.iterdir()):
                continue
            yield ".".join([package, *path.relative_to(base).parts]), path


def test_every_source_folder_is_a_listed_package() -> None:
    """setuptools ships only listed packages: a folder left out is missing from the wheel."""
    listed = set(SETUPTOOLS["packages"])
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    unlisted = [
        package
        for package, path in _package_folders()
        if package not in listed
        and any(str(f.relative_to(ROOT)) in tracked for f in path.iterdir() if f.is_file())
    ]
    assert not unlisted, f"add to [tool.setuptools] packages (and package-data): {unlisted}"


def test_shipped_files_are_found_through_edgefl_resources() -> None:
    from edgefl.resources import deploy_path, package_path, source_checkout
    from edgefl.server.broker_config import default_template_path
    from edgefl.server.fl.fleet_proxy import default_template_path as nginx_template

    assert source_checkout() == ROOT
    assert default_template_path() == ROOT / "deploy" / "mosquitto" / "edgefl.conf.template"
    assert nginx_template() == ROOT / "deploy" / "nginx" / "fleet-proxy.conf.template"
    assert deploy_path("systemd", "edgefl-agent.service").is_file()
    assert (package_path("edgefl.server.registry.migrations") / "script.py.mako").is_file()


def test_the_shipped_agent_example_is_valid_in_todays_keys() -> None:
    from edgefl.config import config_renames, load_config
    from edgefl.edge_agent.daemon import AgentConfig

    config = load_config(AgentConfig, ROOT / "deploy" / "agent.example.yaml")
    assert config_renames(config) == []
    assert config.mqtt.tls.ca_file is not None


def test_an_installed_package_finds_deploy_inside_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel's layout: site-packages/edgefl/deploy, and no checkout around it."""
    from edgefl import resources

    package = tmp_path / "venv" / "lib" / "site-packages" / "edgefl"
    (package / "deploy" / "mosquitto").mkdir(parents=True)
    (package / "deploy" / "mosquitto" / "acl").write_text("# acl\n")
    # A pyproject.toml above the venv (a venv inside another project) is no checkout.
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    monkeypatch.setattr(resources, "_PACKAGE", package)
    assert resources.source_checkout() is None
    assert resources.deploy_path("mosquitto", "acl") == package / "deploy" / "mosquitto" / "acl"


def test_a_missing_shipped_file_is_a_config_error_naming_it() -> None:
    from edgefl.errors import ConfigError
    from edgefl.resources import deploy_path, package_path

    with pytest.raises(ConfigError, match="no-such-file"):
        deploy_path("mosquitto", "no-such-file")
    with pytest.raises(ConfigError, match="not an installed package"):
        package_path("edgefl.no_such_package")


@pytest.mark.slow
def test_the_wheel_carries_what_a_deployment_needs(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import wheel_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    wheel = wheel_check.build_wheel(ROOT, tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    counts = wheel_check.wheel_contents(wheel)  # the files scripts/wheel_check.py needs
    assert counts["deploy files"] >= 5
    # Everything in deploy/, the migrations and the scenarios, as in the source tree.
    for folder, installed in [
        ("deploy", "edgefl/deploy"),
        ("server/registry/migrations", "edgefl/server/registry/migrations"),
        ("simulations/scenarios", "edgefl/simulations/scenarios"),
    ]:
        for name in wheel_check.source_files(ROOT):
            if name.startswith(folder + "/") and not name.endswith(".pyc"):
                assert f"{installed}/{name[len(folder) + 1 :]}" in names, name
    assert {n for n in names if n.endswith(".proto")} == {
        f"edgefl/proto/{p.name}" for p in (ROOT / "proto").glob("*.proto")
    }
    # Nothing from outside the package: no tests, benchmarks or scripts.
    assert all(n.startswith(("edgefl/", "edgefl-")) for n in names)
