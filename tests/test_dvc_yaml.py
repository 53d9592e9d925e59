"""dvc.yaml says what each stage's result depends on, derived from the code (so it stays correct).

For every stage of dvc.yaml (whatever stages it holds: the command `mme <cmd>` names the stage module
through `mme.cli.STAGES`):

- `deps:` under mme/ cover the stage's module closure: every file that importing the stage module
  executes (ast imports through mme/, lazy ones inside functions included, plus each package's
  `__init__.py`; `tests/importgraph.py`), and every listed mme/ path holds at least one closure file.
  The registry names `mme.config.REGISTERED` looks up by string only decide which names validation
  accepts, so they are not followed. The other deps are outputs of earlier stages.
- `params:` equal the config keys the stage reads minus `NOT_RESULT` (`mme.config.SPEED_ONLY`, the
  worker counts: they change how fast, never what is computed). The keys read are recorded by running
  the stage's command on the smoke preset through `mme.cli.main` with a traced config: every config
  dataclass in the tree is swapped for a subclass that records each leaf read (`cfg.data.stride` ->
  `data.stride`), through aliases (`train = cfg.pretrain`) and copies alike. Not counted as reads:
  copying the whole tree (`to_dict`, `flat`, `digest`: checkpoint extras, MLflow params), reads made
  inside `mme.engine.tracking` (MLflow names and tags) and reads of a key the stage overwrote in its
  own copy (`single_view` sets `evaluate.num_clips`). Worker counts are set to 0 so that every read
  happens in this process. A key read only on a branch the smoke run does not take must be named,
  with the reason, in `OTHER_BRANCHES`; a key listed in dvc.yaml that is neither read nor named there
  fails.

What this guarantees: changing any key the stage read on the smoke path (or a file it imports)
invalidates it in `dvc status`, and nothing else in params.yaml does. The same key lists answer
`mme STAGE --help` (`mme.cli.stage_keys`), checked here against dvc.yaml as well.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import importgraph
import pytest
import yaml

from mme import cli, config

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = REPO / "dvc.yaml"
pytestmark = pytest.mark.slow

# Keys that never invalidate a stage (they change speed, not results): the one list is mme.config's.
NOT_RESULT = config.SPEED_ONLY
# Keys a stage reads only on a branch the smoke run does not take -> why they are listed anyway.
OTHER_BRANCHES: dict[str, dict[str, str]] = {
    "download": {"data.folder": "read only for data.dataset=folder",
                 "data.split": "read only for the real datasets' official splits"},
}
# Reads made inside these modules are bookkeeping (MLflow run names, tags), not inputs of a result.
BOOKKEEPING = frozenset({"mme.engine.tracking"})
ZERO_WORKERS = ("data.num_workers=0", "data.synthetic.workers=0", "flow.workers=0")


class Reads:
    """The config keys read while `paused` is 0."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.paused = 0


def _traced_class(base: type, prefix: str, reads: Reads) -> type:
    names = {f.name for f in dataclasses.fields(base)}

    def __getattribute__(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in names and not dataclasses.is_dataclass(value) and not reads.paused:
            own = object.__getattribute__(self, "__dict__").get("_trace_overwritten", ())
            if name not in own and sys._getframe(1).f_globals.get("__name__") not in BOOKKEEPING:
                reads.keys.add(prefix + name)
        return value

    def __setattr__(self: Any, name: str, value: Any) -> None:
        own = object.__getattribute__(self, "__dict__").get("_trace_overwritten")
        if name in names and own is not None:
            own.add(name)
        object.__setattr__(self, name, value)

    namespace: dict[str, Any] = {"__getattribute__": __getattribute__, "__setattr__": __setattr__}
    if base is config.Config:
        def to_dict(self: Any) -> dict[str, Any]:
            reads.paused += 1
            try:
                return base.to_dict(self)
            finally:
                reads.paused -= 1

        namespace["to_dict"] = to_dict
    return type(f"Traced{base.__name__}", (base,), namespace)


def traced(cfg: config.Config, reads: Reads, prefix: str = "") -> config.Config:
    """Turn `cfg` (in place) into a tree whose leaf reads are recorded in `reads`."""
    for item in dataclasses.fields(cfg):
        value = object.__getattribute__(cfg, item.name)
        if dataclasses.is_dataclass(value):
            traced(value, reads, f"{prefix}{item.name}.")
    cfg.__class__ = _traced_class(type(cfg), prefix, reads)
    object.__getattribute__(cfg, "__dict__")["_trace_overwritten"] = set()
    return cfg


def dvc_stages() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def command_of(stage: dict[str, Any]) -> list[str]:
    """`mme probe --init none` -> ["probe", "--init", "none"]."""
    words = shlex.split(stage["cmd"])
    assert words[0] == "mme" and words[1] in cli.STAGES, f"cmd {stage['cmd']!r} is not `mme <stage command>`"
    return words[1:]


def resolved(entry: Any, cfg: config.Config) -> str:
    """A deps/outs entry with `${key}` replaced by its smoke value."""
    name = next(iter(entry)) if isinstance(entry, dict) else entry
    flat = cfg.flat()
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(flat[m.group(1)]), name)


def run_order(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Stages ordered so that every stage comes after the stages whose outs it depends on."""
    cfg = config.load_config("smoke")
    outs = {resolved(o, cfg): name for name, s in stages.items() for o in s.get("outs", [])}
    order: list[str] = []

    def visit(name: str) -> None:
        for dep in stages[name].get("deps", []):
            if resolved(dep, cfg) in outs and outs[resolved(dep, cfg)] not in order:
                visit(outs[resolved(dep, cfg)])
        if name not in order:
            order.append(name)

    for name in stages:
        visit(name)
    return order


@pytest.fixture(scope="module")
def keys_read(tmp_path_factory) -> dict[str, set[str]]:
    """stage -> the config keys its command read, every stage run in order on smoke in one workdir."""
    workdir = tmp_path_factory.mktemp("traced")
    stages, found = dvc_stages(), {}
    real = cli.load_config
    monkey = pytest.MonkeyPatch()
    try:
        monkey.chdir(workdir)  # no params.yaml here: the smoke preset alone
        for name in run_order(stages):
            reads = Reads()

            def load(_preset: Any, overrides: list[str], params: Any = None, _reads: Reads = reads) -> Any:
                return traced(real("smoke", [*ZERO_WORKERS, *overrides], params), _reads)

            monkey.setattr(cli, "load_config", load)
            code = cli.main([*command_of(stages[name]), "--workdir", str(workdir)])
            assert code == 0, f"stage {name} failed on smoke"
            found[name] = reads.keys
    finally:
        monkey.undo()
    return found


def test_the_tracer_sees_reads_through_aliases_and_copies():
    import copy

    reads = Reads()
    cfg = traced(config.load_config("smoke"), reads)
    section = cfg.pretrain
    assert section.epochs == 1 and reads.keys == {"pretrain.epochs"}
    cfg.to_dict(), cfg.flat(), cfg.digest()
    view = copy.deepcopy(cfg)
    view.evaluate.num_clips = 1
    assert (view.evaluate.num_clips, view.data.stride) == (1, 2)
    assert reads.keys == {"pretrain.epochs", "data.stride"}


def test_params_are_the_keys_each_stage_reads(keys_read):
    wrong = []
    for name, stage in dvc_stages().items():
        listed = set(stage.get("params", []))
        expected = keys_read[name] - NOT_RESULT
        branches = OTHER_BRANCHES.get(name, {})
        missing, extra = expected - listed, listed - expected - set(branches)
        if missing or extra:
            wrong.append(f"{name}: add {sorted(missing)}, remove {sorted(extra)}")
        assert not listed & NOT_RESULT, f"{name} lists worker counts {sorted(listed & NOT_RESULT)}"
        assert set(branches) <= listed, f"{name}: OTHER_BRANCHES names keys dvc.yaml does not list"
    assert not wrong, "dvc.yaml params differ from the keys read:\n" + "\n".join(wrong)


def test_stage_help_lists_the_same_keys():
    for name, stage in dvc_stages().items():
        command = command_of(stage)[0]
        if command == name:
            assert set(cli.stage_keys(command)) == set(stage.get("params", [])), name


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_deps_cover_each_stage_module_closure():
    cfg = config.load_config("smoke")
    stages = dvc_stages()
    outs = {resolved(o, cfg) for s in stages.values() for o in s.get("outs", [])}
    for name, stage in stages.items():
        module = f"mme.stages.{cli.STAGES[command_of(stage)[0]][0]}"
        files = {str(p.relative_to(REPO)) for p in importgraph.closure(module)}
        deps = [resolved(d, cfg) for d in stage.get("deps", [])]
        code = [d for d in deps if d.startswith("mme/")]
        assert not {f for f in files if not covered(f, code)}, f"{name}: deps miss " + \
            ", ".join(sorted(f for f in files if not covered(f, code)))
        unused = [d for d in code if not any(covered(f, [d]) for f in files)]
        assert not unused, f"{name}: deps {unused} hold no module the stage imports"
        for dep in deps:
            assert dep.startswith("mme/") or dep in outs or dep.startswith("reports/metrics/"), \
                f"{name}: dep {dep} is neither code nor another stage's output"


def test_closure_follows_lazy_and_from_imports(tmp_path):
    root = tmp_path / "mme"
    (root / "a").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "a/__init__.py": "", "a/x.py": "def f():\n    from mme.a import y\n",
                      "a/y.py": "from .. import z\n", "z.py": "", "w.py": ""}.items():
        (root / rel).write_text(text)
    found = {str(p.relative_to(tmp_path)) for p in importgraph.closure("mme.a.x", root)}
    assert found == {"mme/__init__.py", "mme/a/__init__.py", "mme/a/x.py", "mme/a/y.py", "mme/z.py"}
