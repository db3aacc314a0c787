"""The repository's shape, read from its import graph (every import, including those inside functions): no cycle,
at most 3 levels of local imports under any script, the model imports nothing of ours, and no file imports a
script (a file that reads its settings at import time)."""
import ast

from conftest import ROOT


def local_modules():
    """{module name: path} of the repository's own modules: its top-level .py files."""
    return {p.stem: p for p in ROOT.glob('*.py')}


def imports_of(path, known):
    """The local modules a file imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & known.keys() - {path.stem}


def reads_settings_on_import(path):
    """A script: it calls configure(...) at module level (importing it would run it)."""
    tree = ast.parse(path.read_text(encoding='utf-8'))
    return any(isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
               and getattr(node.value.func, 'id', None) == 'configure' for node in tree.body) or any(
        isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and getattr(node.value.func, 'id', None) == 'configure' for node in tree.body)


def graph():
    modules = local_modules()
    files = {**{name: path for name, path in modules.items()},
             **{f'data/{p.parent.name}/prepare': p for p in ROOT.glob('data/*/prepare.py')}}
    return modules, {name: imports_of(path, modules) for name, path in files.items()}


def depth(name, edges, stack=()):
    assert name not in stack, f'import cycle: {" -> ".join(stack + (name,))}'
    return max((1 + depth(dep, edges, stack + (name,)) for dep in edges.get(name, ())), default=0)


def test_no_cycle_and_at_most_three_levels():
    _, edges = graph()
    levels = {name: depth(name, edges) for name in edges}  # depth() fails on a cycle, naming it
    assert max(levels.values()) <= 3, {name: n for name, n in levels.items() if n > 3}


def test_the_model_and_the_decoding_module_import_nothing_of_ours_above_them():
    _, edges = graph()
    assert edges['model'] == set()  # the architecture stands alone: no decoding, optimizer or loading code
    # decoding drives the model and knows nothing of checkpoints: the decoder the model's forward pass alone (it hands
    # the model its cache, the model calls it back: not an import), generate.py the decoder
    assert edges['decoder'] == set() and edges['generate'] <= {'decoder'}


def test_no_file_imports_a_script():
    modules, edges = graph()
    scripts = {name for name, path in modules.items() if reads_settings_on_import(path)}
    assert {'train', 'sample', 'eval', 'export_hf'} <= scripts  # prepare.py and bench.py run from main(): importable
    wrong = {name: deps & scripts for name, deps in edges.items() if deps & scripts}
    assert not wrong, wrong


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The check itself: an import inside a function counts, so a circle closed that way is found."""
    (tmp_path / 'a.py').write_text('import b\n')
    (tmp_path / 'b.py').write_text('def f():\n    from a import x\n    return x\n')
    known = {'a': tmp_path / 'a.py', 'b': tmp_path / 'b.py'}
    edges = {name: imports_of(path, known) for name, path in known.items()}
    assert edges == {'a': {'b'}, 'b': {'a'}}
    try:
        depth('a', edges)
    except AssertionError as e:
        assert 'import cycle: a -> b -> a' in str(e)
    else:
        raise AssertionError('the cycle was not found')


def test_the_scripts_start_without_the_heavy_optional_parts_of_torch():
    """Every start of train.py, sample.py and eval.py (the test suite alone starts them hundreds of times) would pay
    half a second for torch.distributed.tensor / fsdp (sympy and more), and seconds for transformers: only the runs
    that use FSDP, or GPT-2 weights, may import them."""
    import subprocess
    import sys
    heavy = ('torch.distributed.tensor', 'torch.distributed.fsdp', 'transformers', 'matplotlib')
    code = ('import sys, checkpoint, dataset, generate, metrics, model, multiple_choice, muon, parallel, runtime, '
            f'tokenizer; print(" ".join(m for m in {heavy!r} if m in sys.modules))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [], proc.stdout
