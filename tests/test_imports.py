"""Imports point one way: a module of ``overfocus_jax`` imports only from its own layer or the layers before it.

Every ``.py`` file under ``overfocus_jax/`` is read with ``ast``; nothing is imported. Every import of the package
counts, wherever it is: at the top, inside a function, a method or a class, under ``if TYPE_CHECKING``.
``from a.b import c`` imports the module ``a.b.c`` when that file exists, else the name ``c`` of ``a.b``; relative
imports are resolved against the importing module's package. Importing ``a.b.c`` also runs the ``__init__.py`` of
``a.b`` (and of ``a``) first: those edges count for the cycles too, except to the importer's own packages, which
are always initialised before the importer itself runs.

Checked on the real package: every module has a layer; no import points to a higher layer or across the
independent units of layer 1; no cycle among modules; no cycle among units the layers keep apart (``challenge``
importing ``train.step`` while ``train.loop`` imports ``challenge`` is a cycle between two packages although no
module closes it); every imported module and name exists. The checker itself is tested on small packages written
to ``tmp_path``.
"""

import ast
import collections
import dataclasses
import functools
import pathlib
import textwrap

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "overfocus_jax"

# rank → the units of that layer. A unit is a module, or a package with all its submodules; the top package
# ``overfocus_jax`` stands for its own __init__.py alone (the public namespace: it imports nothing when it is
# imported, and each name's module when the name is first used; PURE below says which modules those may be).
# A module may import its own unit, the other units of its rank, and any lower rank.
LAYERS = {
    0: ("overfocus_jax", "overfocus_jax.errors", "overfocus_jax.files", "overfocus_jax.overrides",
        "overfocus_jax.onednn", "overfocus_jax.host_memory", "overfocus_jax.plugins", "overfocus_jax.fields"),
    1: ("overfocus_jax.data", "overfocus_jax.models", "overfocus_jax.parallel", "overfocus_jax.platform_tuning",
        "overfocus_jax.compilation_cache", "overfocus_jax.optimization"),
    2: ("overfocus_jax.challenge",),  # the regularizers: masks, attribution, sgdrop, rsc and their base API
    3: ("overfocus_jax.config", "overfocus_jax.configs", "overfocus_jax.regularizers"),  # the config and its parts
    4: ("overfocus_jax.train",),
    5: ("overfocus_jax.explain", "overfocus_jax.dg", "overfocus_jax.sweeps"),
    6: ("overfocus_jax.cli", "overfocus_jax.__main__"),
}
INDEPENDENT_RANKS = (1,)  # the units of these ranks do not import one another (data does not import models, ...)


# ------------------------------------------------------------------------------------------------- the checker


@dataclasses.dataclass(frozen=True)
class Edge:
  """``importer`` imports ``imported`` at ``where`` (file:line)."""
  importer: str
  imported: str
  where: str
  in_function: bool = False  # runs when the function is called, not when the module is imported
  via_package: bool = False  # not named: the __init__ of a package the named module is in

  def __str__(self):
    notes = "".join(f", {note}" for note, on in (("inside a function", self.in_function),
                                                 ("its package __init__ runs first", self.via_package)) if on)
    return f"{self.importer} -> {self.imported} ({self.where}{notes})"


@dataclasses.dataclass
class Imports:
  root: pathlib.Path  # the folder holding the package; file names are relative to it
  modules: dict[str, pathlib.Path]  # dotted name → file
  edges: list[Edge]
  missing: list[str]  # imports of modules or names that do not exist


def find_modules(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join((package_dir.name, *parts))] = path
  return modules


class _ImportStatements(ast.NodeVisitor):
  def __init__(self):
    self.found, self._functions = [], 0

  def _function(self, node):
    self._functions += 1
    self.generic_visit(node)
    self._functions -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

  def _import(self, node):
    self.found.append((node, self._functions > 0))

  visit_Import = visit_ImportFrom = _import


def _top_level_names(tree: ast.Module) -> set[str] | None:
  """The names a module binds outside its functions and classes; None if it cannot tell (``*``, ``__getattr__``)."""
  names, todo = set(), list(tree.body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        if alias.name == "*":
          return None
        names.add(alias.asname or alias.name.partition(".")[0])
    else:
      if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        names.add(node.id)
      elif isinstance(node, ast.ExceptHandler) and node.name:
        names.add(node.name)
      todo.extend(ast.iter_child_nodes(node))
  return None if "__getattr__" in names else names


def _in_package(name: str, top: str) -> bool:
  return name == top or name.startswith(top + ".")


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _absolute_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
  """The module a ``from X import ...`` reads from, relative imports resolved; None above the top package."""
  if not node.level:
    return node.module
  package = importer if is_package else importer.rpartition(".")[0]
  parts = package.split(".")
  if node.level - 1 >= len(parts):
    return None
  base = ".".join(parts[:len(parts) - (node.level - 1)])
  return f"{base}.{node.module}" if node.module else base


def read_imports(package_dir: pathlib.Path) -> Imports:
  top, root = package_dir.name, package_dir.parent
  modules = find_modules(package_dir)
  trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
  edges, missing = [], []
  for importer, tree in trees.items():
    path = modules[importer]
    statements = _ImportStatements()
    statements.visit(tree)
    for node, in_function in statements.found:
      where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
      named, runs = [], []  # the modules the statement names; the packages whose __init__ it runs on the way
      if isinstance(node, ast.Import):
        for alias in node.names:
          if not _in_package(alias.name, top):
            continue
          if alias.name in modules:
            named.append(alias.name)
          else:
            missing.append(f"{importer} ({where}): no module {alias.name}")
      else:
        base = _absolute_base(node, importer, path.name == "__init__.py")
        if base is None:
          missing.append(f"{importer} ({where}): relative import above the top package")
          continue
        if not _in_package(base, top):
          continue
        if base not in modules:
          missing.append(f"{importer} ({where}): no module {base}")
          continue
        runs.append(base)
        for alias in node.names:
          if f"{base}.{alias.name}" in modules:
            named.append(f"{base}.{alias.name}")
          else:
            named.append(base)
            defined = _top_level_names(trees[base])
            if alias.name != "*" and defined is not None and alias.name not in defined:
              missing.append(f"{importer} ({where}): {base} has no {alias.name}")
      for imported in dict.fromkeys(named):
        if imported != importer:
          edges.append(Edge(importer, imported, where, in_function))
      own_packages = {importer, *_ancestors(importer)}  # already initialised when the importer runs
      for package in dict.fromkeys(p for name in [*runs, *named] for p in [*_ancestors(name), name]):
        if package in modules and package not in own_packages and package not in named:
          edges.append(Edge(importer, package, where, in_function, via_package=True))
  return Imports(root, modules, edges, missing)


def unit_of(module: str, layers: dict) -> tuple[int, str] | None:
  """(rank, unit) of the longest unit that is ``module`` or a package holding it; the top package holds nothing."""
  found = [(len(unit), rank, unit) for rank, units in layers.items() for unit in units
           if module == unit or ("." in unit and module.startswith(unit + "."))]
  return max(found)[1:] if found else None


def _short(unit: str) -> str:
  return unit.partition(".")[2] or unit


def unplaced_modules(imports: Imports, layers: dict) -> list[str]:
  return [f"{name} ({path.relative_to(imports.root).as_posix()})"
          for name, path in imports.modules.items() if unit_of(name, layers) is None]


def layer_violations(imports: Imports, layers: dict, independent=()) -> list[str]:
  problems, seen = [], set()
  for edge in imports.edges:
    source, target = unit_of(edge.importer, layers), unit_of(edge.imported, layers)
    if source is None or target is None or source[1] == target[1]:
      continue
    (source_rank, source_unit), (target_rank, target_unit) = source, target
    if target_rank > source_rank:
      why = f"{_short(source_unit)} (rank {source_rank}) imports {_short(target_unit)} (rank {target_rank})"
    elif target_rank == source_rank and source_rank in independent:
      why = f"{_short(source_unit)} imports {_short(target_unit)}, another unit of rank {source_rank}"
    else:
      continue
    key = (edge.importer, edge.where, target_unit)  # one line per statement and unit (not its package __init__ too)
    if key not in seen:
      seen.add(key)
      problems.append(f"{edge}: {why}")
  return problems


def _cycles(nodes, successors: dict[str, set[str]]) -> list[list[str]]:
  """Cycles, as paths that end where they start, through every node of every strongly connected component of more
  than one node (Tarjan's algorithm); shortest first from each node in turn."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def connect(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(successors.get(node, ())):
      if nxt not in index:
        connect(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = set()
      while True:  # pop the strongly connected component rooted at node
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(component)

  for node in sorted(nodes):
    if node not in index:
      connect(node)
  found = []
  for component in sorted(components, key=min):
    covered = set()
    for start in sorted(component):  # a shortest cycle through each member that no earlier cycle went through
      if start in covered:
        continue
      parent, queue = {start: None}, collections.deque([start])
      while queue:  # breadth first inside the component until an edge leads back to start
        node = queue.popleft()
        nexts = sorted(successors.get(node, set()) & component)
        if start in nexts:
          path = [node]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          found.append([*reversed(path), start])
          covered.update(path)
          break
        for nxt in nexts:
          if nxt not in parent:
            parent[nxt] = node
            queue.append(nxt)
  return found


def _describe(cycle: list[str], hops) -> str:
  lines = [" -> ".join(cycle)]
  for a, b in zip(cycle, cycle[1:]):
    lines += [f"    {edge}" for edge in hops[a, b]]
  return "\n".join(lines)


def module_cycles(imports: Imports) -> list[str]:
  successors, hops = collections.defaultdict(set), collections.defaultdict(list)
  for edge in imports.edges:
    successors[edge.importer].add(edge.imported)
    hops[edge.importer, edge.imported].append(edge)
  return [_describe(cycle, hops) for cycle in _cycles(imports.modules, successors)]


def unit_cycles(imports: Imports, layers: dict, independent=()) -> list[str]:
  """Cycles between units that the layers keep apart: imports between two units of the same rank are allowed both
  ways (train and config) unless that rank is independent, so they are left out."""
  successors, hops, seen = collections.defaultdict(set), collections.defaultdict(list), set()
  for edge in imports.edges:
    source, target = unit_of(edge.importer, layers), unit_of(edge.imported, layers)
    if source and target and source[1] != target[1] and (source[0] != target[0] or source[0] in independent):
      successors[source[1]].add(target[1])
      if (edge.where, target[1]) not in seen:  # one line per statement, not its package __init__ as well
        seen.add((edge.where, target[1]))
        hops[source[1], target[1]].append(edge)
  units = {unit for unit_list in layers.values() for unit in unit_list}
  return [_describe(cycle, hops) for cycle in _cycles(units, successors)]


def _failure(problems: list[str], what: str, *notes: str) -> str:
  return "\n".join([f"{what}: {len(problems)}", *notes, *problems])


# The library a researcher imports: the public namespace resolves to these modules only, and they import nothing
# outside them (no config, data pipelines, train loop, checkpoints, platform tuning or CLI), directly or through a
# package's __init__.
PURE = ("overfocus_jax.challenge", "overfocus_jax.models", "overfocus_jax.fields", "overfocus_jax.parallel", "overfocus_jax.errors",
        "overfocus_jax.plugins", "overfocus_jax.host_memory", "overfocus_jax.explain.attributions", "overfocus_jax.explain.layers",
        "overfocus_jax.explain.metrics", "overfocus_jax.explain.latent", "overfocus_jax.explain")


def _is_pure(module: str) -> bool:
  return any(module == unit or module.startswith(unit + ".") for unit in PURE if unit != "overfocus_jax.explain") \
      or module == "overfocus_jax.explain"


# ------------------------------------------------------------------------------------------------- the package

LAYER_LINE = "layers: " + " | ".join(f"{rank}: {', '.join(map(_short, units))}" for rank, units in LAYERS.items())


@functools.cache
def package_imports() -> Imports:
  return read_imports(PACKAGE_DIR)


def test_every_module_has_a_layer():
  problems = unplaced_modules(package_imports(), LAYERS)
  assert not problems, _failure(problems, "modules in no layer (place them in LAYERS, tests/test_imports.py)",
                                LAYER_LINE)


def test_imports_point_down_the_layers():
  problems = layer_violations(package_imports(), LAYERS, INDEPENDENT_RANKS)
  independent = ", ".join(map(str, INDEPENDENT_RANKS))
  assert not problems, _failure(
      problems, f"imports that point up the layers or across the independent units of rank {independent}", LAYER_LINE)


def test_no_import_cycles_between_modules():
  problems = module_cycles(package_imports())
  assert not problems, _failure(problems, "import cycles between modules")


def test_no_import_cycles_between_layers():
  """Such a cycle always holds an upward import (test_imports_point_down_the_layers lists it); this shows the whole
  loop, with the imports that point the allowed way, which may sit inside functions (explain.report's of
  train.loop, say) and that no single module needs to close (challenge/__init__ -> train.step, train.loop ->
  challenge)."""
  problems = unit_cycles(package_imports(), LAYERS, INDEPENDENT_RANKS)
  assert not problems, _failure(problems, "import cycles between layers or independent units", LAYER_LINE)


def test_every_imported_module_and_name_exists():
  problems = package_imports().missing
  assert not problems, _failure(problems, "imports of modules or names that do not exist")


def test_the_package_has_the_modules_the_layers_name():
  """The checker reads the real tree: a wrong PACKAGE_DIR would find nothing and pass."""
  imports = package_imports()
  assert {"overfocus_jax", "overfocus_jax.errors", "overfocus_jax.cli", "overfocus_jax.challenge"} <= set(
      imports.modules)
  assert len(imports.edges) > 20


# ------------------------------------------------------------------------------------------------- the checker


def write_package(tmp_path, files: dict[str, str]) -> pathlib.Path:
  """``files``: path inside the package → source. Each folder gets an empty __init__.py unless given one."""
  package = tmp_path / "pkg"
  for relative, source in {"__init__.py": "", **files}.items():
    path = package / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
  for folder in [package, *package.rglob("*")]:
    if folder.is_dir() and not (folder / "__init__.py").exists():
      (folder / "__init__.py").write_text("")
  return package


TWO_LAYERS = {0: ("pkg", "pkg.low"), 1: ("pkg.high",)}


def test_checker_flags_an_upward_import_inside_a_function(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "low.py": """\
          def f():
            from pkg import high
            return high.X
          """,
      "high.py": "X = 1\n"}))
  assert layer_violations(imports, TWO_LAYERS) == [
      "pkg.low -> pkg.high (pkg/low.py:2, inside a function): low (rank 0) imports high (rank 1)"]
  assert not module_cycles(imports) and not imports.missing and not unplaced_modules(imports, TWO_LAYERS)


def test_checker_flags_imports_across_independent_units(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "a/__init__.py": "from ..b import thing\n",  # relative, from a package: pkg.a → pkg → pkg.b
      "b.py": "thing = 1\n"}))
  layers = {0: ("pkg",), 1: ("pkg.a", "pkg.b")}
  assert layer_violations(imports, layers, independent=(1,)) == [
      "pkg.a -> pkg.b (pkg/a/__init__.py:1): a imports b, another unit of rank 1"]
  assert layer_violations(imports, layers, independent=()) == []


def test_checker_reports_a_two_module_cycle_as_a_path(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "a.py": "from . import b\n",
      "b.py": """\
          def f():
            import pkg.a as a
            return a
          """}))
  assert module_cycles(imports) == ["pkg.a -> pkg.b -> pkg.a\n"
                                    "    pkg.a -> pkg.b (pkg/a.py:1)\n"
                                    "    pkg.b -> pkg.a (pkg/b.py:2, inside a function)"]
  layers = {0: ("pkg", "pkg.a"), 1: ("pkg.b",)}
  assert unit_cycles(imports, layers) == module_cycles(imports)
  assert layer_violations(imports, layers) == ["pkg.a -> pkg.b (pkg/a.py:1): a (rank 0) imports b (rank 1)"]


def test_checker_counts_package_inits_but_not_the_importers_own(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "sub/__init__.py": """\
          from pkg.sub import leaf  # its own submodule: leaf's own package is no cycle
          def f():
            from pkg import other
          """,
      "sub/leaf.py": "from pkg.sub.sibling import x\n",
      "sub/sibling.py": "x = 1\n",
      "other.py": "import pkg.sub.sibling\n"}))  # runs pkg/sub/__init__.py first, which imports other
  assert module_cycles(imports) == ["pkg.other -> pkg.sub -> pkg.other\n"
                                    "    pkg.other -> pkg.sub (pkg/other.py:1, its package __init__ runs first)\n"
                                    "    pkg.sub -> pkg.other (pkg/sub/__init__.py:3, inside a function)"]


def test_checker_finds_a_cycle_between_units_that_no_module_closes(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "challenge/__init__.py": "from pkg.train.step import Regularizer\n",
      "train/step.py": "Regularizer = object\n",
      "train/loop.py": "from pkg.challenge import build\n"}))
  assert module_cycles(imports) == []
  assert unit_cycles(imports, {0: ("pkg",), 1: ("pkg.challenge", "pkg.train")}) == []  # one layer: allowed
  assert unit_cycles(imports, {0: ("pkg",), 1: ("pkg.challenge", "pkg.train")}, independent=(1,)) == [
      "pkg.challenge -> pkg.train -> pkg.challenge\n"
      "    pkg.challenge -> pkg.train.step (pkg/challenge/__init__.py:1)\n"
      "    pkg.train.loop -> pkg.challenge (pkg/train/loop.py:1)"]
  assert unit_cycles(imports, {0: ("pkg",), 1: ("pkg.challenge",), 2: ("pkg.train",)}) == ["pkg.challenge -> pkg.train -> pkg.challenge\n"
                                          "    pkg.challenge -> pkg.train.step (pkg/challenge/__init__.py:1)\n"
                                          "    pkg.train.loop -> pkg.challenge (pkg/train/loop.py:1)"]
  assert imports.missing == ["pkg.train.loop (pkg/train/loop.py:1): pkg.challenge has no build"]


def test_checker_resolves_each_kind_of_import(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "sub/__init__.py": "NAME = 1\n",
      "sub/leaf.py": "",
      "top.py": """\
          import pkg.sub.leaf as leaf_alias
          from pkg.sub import leaf, NAME
          from .sub import leaf as again
          from . import other
          class C:
            from pkg import sub
          import numpy, os.path
          """,
      "other.py": "from .sub.leaf import *\nfrom ..pkg import nothing\n"}))
  assert {(e.importer, e.imported, e.where, e.via_package) for e in imports.edges} == {
      ("pkg.top", "pkg.sub.leaf", "pkg/top.py:1", False), ("pkg.top", "pkg.sub", "pkg/top.py:1", True),
      ("pkg.top", "pkg.sub.leaf", "pkg/top.py:2", False), ("pkg.top", "pkg.sub", "pkg/top.py:2", False),
      ("pkg.top", "pkg.sub.leaf", "pkg/top.py:3", False), ("pkg.top", "pkg.sub", "pkg/top.py:3", True),
      ("pkg.top", "pkg.other", "pkg/top.py:4", False),
      ("pkg.top", "pkg.sub", "pkg/top.py:6", False),
      ("pkg.other", "pkg.sub.leaf", "pkg/other.py:1", False), ("pkg.other", "pkg.sub", "pkg/other.py:1", True)}
  assert imports.missing == ["pkg.other (pkg/other.py:2): relative import above the top package"]


def test_checker_passes_a_clean_package_and_lists_unplaced_modules(tmp_path):
  imports = read_imports(write_package(tmp_path, {
      "errors.py": "class UserError(Exception):\n  pass\n",
      "data/__init__.py": "",
      "data/sources.py": "from pkg.errors import UserError\nfrom . import shifts\n",
      "data/shifts.py": "from ..errors import UserError\n",
      "models.py": "from pkg import errors\n",
      "train/loop.py": "from pkg.data import sources\nfrom pkg.models import errors\ndef f():\n  import pkg.data\n",
      "cli.py": "import pkg.train.loop\n",
      "extra.py": "",
      "sub/deep.py": ""}))
  layers = {0: ("pkg", "pkg.errors"), 1: ("pkg.data", "pkg.models"), 2: ("pkg.train",), 3: ("pkg.cli",)}
  assert layer_violations(imports, layers, independent=(1,)) == []
  assert module_cycles(imports) == [] and unit_cycles(imports, layers, (1,)) == [] and not imports.missing
  assert unplaced_modules(imports, layers) == ["pkg.extra (pkg/extra.py)", "pkg.sub (pkg/sub/__init__.py)",
                                               "pkg.sub.deep (pkg/sub/deep.py)"]


def test_the_pure_layer_imports_nothing_of_the_application():
  problems = [str(edge) for edge in package_imports().edges if _is_pure(edge.importer) and not _is_pure(edge.imported)]
  assert not problems, _failure(problems, "pure-layer imports of the application (PURE, tests/test_imports.py)")


def test_the_public_namespace_resolves_to_the_pure_layer_only():
  import overfocus_jax
  sources = set(overfocus_jax._SOURCES.values())
  assert sources and all(_is_pure(module) for module in sources), sorted(m for m in sources if not _is_pure(m))
