"""The layout the README promises (its tree): the recipe on top, support/ imported and never
importing the recipe or the tools, model.py and dataloader.py alone, no import circles, no module
reaching into another's private names, and every docs/ file the code points to in place."""

import ast
import glob
import os
import re

from conftest import ROOT

TOP = ["train_gpt", "model", "dataloader", "fineweb", "evaluate", "convert_hf", "plot"]


def project_files():
    """{module name: path} of every Python module of the project (tests excepted)."""
    paths = [os.path.join(ROOT, f"{name}.py") for name in TOP]
    paths += glob.glob(os.path.join(ROOT, "support", "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    names = {}
    for path in paths:
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        names[rel.removesuffix(".__init__")] = path
    return names


def imports_of(path, known):
    """The project modules a file imports (anywhere in it, functions included), and how it names them."""
    found, aliases = set(), {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    found.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:  # from support import checkpoint
                        found.add(f"{node.module}.{a.name}")
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    else:
                        aliases.setdefault(("name", a.name), node.module)
    return found, aliases


def graph():
    files = project_files()
    return {name: imports_of(path, files)[0] - {name} for name, path in files.items()}, files


def test_support_imports_neither_the_recipe_nor_the_tools_and_model_and_dataloader_stand_alone():
    edges, _ = graph()
    for name, deps in edges.items():
        if name.startswith("support"):
            wrong = {d for d in deps if not (d.startswith("support") or d in ("model", "dataloader"))}
            assert not wrong, f"{name} imports {wrong}: support/ imports only model, dataloader and itself"
        if not name.startswith("tools"):
            assert not {d for d in deps if d.startswith("tools")}, f"{name} imports a tool"
    assert edges["model"] == MODEL_MAY_IMPORT and edges["dataloader"] == set()
    for name in MODEL_MAY_IMPORT:
        assert edges[name] == set(), f"{name}, which model.py imports, imports {edges[name]}: model.py would not stand alone"


# What model.py imports of the project: the attention kernels alone, which import nothing of it.
MODEL_MAY_IMPORT = {"support.attention_kernels"}


def test_model_py_is_the_model_alone():
    """model.py is the model, readable top to bottom (issue 29): 500 lines or fewer, and nothing that
    trains it, no autograd.Function (the chunked loss: support/loss.py) and no optimizer
    (support/optim.py)."""
    path = os.path.join(ROOT, "model.py")
    with open(path) as f:
        source = f.read()
    assert len(source.splitlines()) <= 500
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            assert not any("Function" in b or "optim" in b or "Optimizer" in b for b in bases), (node.name, bases)
        assert not (isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.optim")), ast.unparse(node)


def test_no_import_circles():
    edges, _ = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError(f"import circle: {' -> '.join(path + [node, dep])}")
            if dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def test_no_module_reads_another_modules_private_names():
    _, files = graph()
    for name, path in files.items():
        _, aliases = imports_of(path, files)
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module in files:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{name} reads {node.value.id}.{node.attr} ({aliases[node.value.id]}'s private name)")


def test_every_docs_file_the_code_points_to_exists():
    pointed = set()
    for path in list(project_files().values()) + glob.glob(os.path.join(ROOT, "tools", "*.sh")):
        pointed |= set(re.findall(r"docs/[\w.-]+\.(?:md|png)", open(path).read()))
    assert pointed, "the code points to docs/"
    missing = sorted(p for p in pointed if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"the code points to missing docs files: {missing}"


def test_the_top_level_holds_only_the_commands():
    """The top level is the design card and the commands people run; the tools live in tools/
    (the README says where), with no pointer files left beside the commands."""
    top = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*.sh"))}
    assert top == {f"{name}.py" for name in TOP}


def test_the_readme_tree_names_every_module_and_the_recipe_stays_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name, path in project_files().items():
        if name != "support" and name != "tools":
            assert os.path.basename(path) in readme, f"README's layout tree does not name {os.path.relpath(path, ROOT)}"
    with open(os.path.join(ROOT, "train_gpt.py")) as f:
        assert len(f.readlines()) <= 550  # the recipe, readable in one sitting (issue 21)


def test_the_front_page_and_the_schedule_doc_describe_the_demo_that_runs():
    """Docs drift when a default changes: the demo's steps and batch, as train_gpt.DEMO has them,
    are what the quick start and docs/schedule.md say."""
    import train_gpt
    said = f"{train_gpt.DEMO['max_steps']} steps of {train_gpt.DEMO['total_batch_size']:,} tokens"
    for doc in ("README.md", "docs/schedule.md"):
        with open(os.path.join(ROOT, doc)) as f:
            assert said in " ".join(f.read().split()), f"{doc} does not say the demo trains {said}"


def test_the_recipe_names_the_models_shape_where_a_reader_looks_first():
    """Settings inherits the model's options from model.ModelOptions (defined once), so its first
    comment states the seed's shape and names the switches: both must stay those ModelOptions has."""
    import dataclasses
    import re
    from model import Architecture, ModelOptions, Shape
    text = open(os.path.join(ROOT, "train_gpt.py")).read()
    comment = text.split("class Settings(ModelOptions):")[1].split("model: str")[0]
    shape = dict(re.findall(r"(\w+)=(\d+)", comment))
    defaults = {f.name: f.default for f in dataclasses.fields(ModelOptions)}
    assert shape == {f.name: str(defaults[f.name]) for f in dataclasses.fields(Shape) if isinstance(f.default, int)}
    switches = comment.split("the architecture switches")[1].split("\n")[0].replace(",", " ").split()
    assert switches == [f.name for f in dataclasses.fields(Architecture)]
