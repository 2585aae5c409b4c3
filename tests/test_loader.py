"""The loading convention: declarations, discovery, input shapes, source locations, load errors."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rgap_audit.errors import AuditError
from rgap_audit.loader import iter_models, load_models, parse_shape
from rgap_audit.options import AuditOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def line_of(path: str, needle: str, nth: int = 0) -> int:
    lines = [i for i, text in enumerate(Path(path).read_text().splitlines(), 1) if needle in text]
    return lines[nth]


def load(path: str, names: list[str] | None = None, **opts) -> list:
    return load_models(path, names, AuditOptions(**opts))


def error_of(path: str, names: list[str] | None = None, **opts) -> AuditError:
    with pytest.raises(AuditError) as info:
        load(path, names, **opts)
    return info.value


# --------------------------------------------------------------------------- declarations


def test_paper_nets_declaration_shapes_losses_and_locations():
    path = str(EXAMPLES / "paper_nets.py")
    models = {m.name: m for m in load(path)}
    assert list(models) == ["CNN6", "CNN6-d", "FCN3"]
    assert models["CNN6"].input_shape == (3, 32, 32)
    assert models["FCN3"].input_shape == (1, 28, 28)
    assert all(m.loss == "logistic" and not m.module.training for m in models.values())
    cnn6 = models["CNN6"]
    assert cnn6.location.line == line_of(path, "def cnn6(")
    conv2 = line_of(path, "nn.Conv2d(12, width2")
    assert cnn6.layer_locations["2"].line == conv2
    assert cnn6.layer_locations["2"].col == 9  # the start of the `nn.Conv2d(` call
    # activations come from `act = lambda: ...`: each points at its own `act(),` line, not the lambda
    assert cnn6.layer_locations["3"].line == conv2 + 1
    assert models["CNN6-d"].location.line == line_of(path, "def cnn6_d(")


def test_declaration_forms_list_callable_and_shorthand(tmp_path):
    path = write(
        tmp_path,
        "forms.py",
        """
        import torch.nn as nn

        def small():
            return nn.Sequential(nn.Linear(4, 2, bias=False))

        class Big(nn.Module):
            def __init__(self, width=8):
                super().__init__()
                self.fc = nn.Linear(width, 1, bias=False)

        def RGAP_MODELS():
            return [small, {"name": "big", "factory": Big, "batch_size": 2, "loss": "logistic"}]
        """,
    )
    models = load(path)
    assert [m.name for m in models] == ["small", "big"]
    assert models[0].input_shape == (4,)  # inferred from the first Linear
    assert (models[1].batch_size, models[1].loss, models[1].input_shape) == (2, "logistic", (8,))
    assert models[1].location.line == line_of(path, "class Big")


def test_declaration_unknown_key_and_bad_values(tmp_path):
    path = write(tmp_path, "bad_key.py", 'import torch.nn as nn\nRGAP_MODELS = {"M": {"factory": nn.Linear, "shape": (3,)}}\n')
    err = error_of(path)
    assert "unknown key" in err.cause and "'shape'" in err.cause and err.model == "M" and err.line == 2
    path = write(tmp_path, "bad_loss.py", 'import torch.nn as nn\nRGAP_MODELS = {"M": {"factory": nn.Identity, "loss": "mse"}}\n')
    assert "unknown loss" in error_of(path).cause
    path = write(tmp_path, "instance.py", 'import torch.nn as nn\nRGAP_MODELS = {"M": nn.Linear(2, 2)}\n')
    assert "module instance" in error_of(path).cause


# --------------------------------------------------------------------------- discovery


def test_discovery_rules(tmp_path):
    marker = tmp_path / "called.txt"
    write(tmp_path, "helpers.py", "import torch.nn as nn\nclass Imported(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3, 3)\n")
    path = write(
        tmp_path,
        "models.py",
        f"""
        from __future__ import annotations
        import torch.nn as nn
        from helpers import Imported  # defined elsewhere: not a model of this file

        class Block(nn.Module):  # used inside Net: a building block
            def __init__(self, c=4):
                super().__init__()
                self.fc = nn.Linear(c, c)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.b = Block()
                self.out = nn.Linear(4, 1)

        class Swish(nn.Module):  # no parameters: nothing to leak
            def forward(self, x):
                return x

        class Head(nn.Module):  # needs arguments: skipped while other models exist
            def __init__(self, n):
                super().__init__()

        class _Private(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

        def wide() -> nn.Sequential:  # annotated factory: called
            return nn.Sequential(nn.Linear(6, 2))

        def train():  # not annotated: never called
            open({str(marker)!r}, "w").write("called")
            return nn.Linear(2, 2)
        """,
    )
    models = load(path)
    assert [m.name for m in models] == ["Net", "wide"]
    assert not marker.exists()
    assert models[0].input_shape == (4,)
    # an explicitly named unannotated function is called: the user asked for it
    assert [m.name for m in load(path, ["train"])] == ["train"] and marker.exists()
    assert [m.name for m in load(path, ["Block"])] == ["Block"]


def test_unknown_name_lists_the_models(tmp_path):
    err = error_of(str(EXAMPLES / "paper_nets.py"), ["CNN7"])
    assert "no model named 'CNN7'" in err.cause and "CNN6, CNN6-d, FCN3" in err.cause and err.model == "CNN7"


def test_several_names_and_per_model_errors_do_not_stop_the_others(tmp_path):
    items = list(iter_models(str(EXAMPLES / "paper_nets.py"), ["FCN3", "Nope", "CNN6"], AuditOptions()))
    assert [type(i).__name__ for i in items] == ["AuditError", "LoadedModel", "LoadedModel"]
    assert [i.name for i in items[1:]] == ["FCN3", "CNN6"]


# --------------------------------------------------------------------------- input shapes


def test_input_shape_precedence(tmp_path):
    path = str(EXAMPLES / "relu_cnn.py")
    assert load(path)[0].input_shape == (1, 14, 14)  # declaration
    assert load(path, input_shape=(1, 28, 28))[0].input_shape == (1, 28, 28)  # command line wins
    per_model = {"ReluCNN": {"input_shape": (1, 7, 7), "loss": "cross-entropy"}}
    m = load_models(path, None, AuditOptions(), per_model=per_model, fallback={"input_shape": (1, 9, 9), "batch_size": 3})[0]
    assert (m.input_shape, m.loss, m.batch_size) == ((1, 7, 7), "cross-entropy", 3)  # config [models] > declaration > defaults


def test_input_shape_inference_and_errors(tmp_path):
    flat = write(tmp_path, "flat.py", "import torch.nn as nn\nclass Flat(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.f = nn.Flatten()\n        self.fc = nn.Linear(12, 1)\n    def forward(self, x):\n        return self.fc(self.f(x))\n")
    err = error_of(flat)
    assert "input shape unknown" in err.cause and "flatten" in err.cause and "--input-shape" in err.cause
    assert err.model == "Flat" and err.line == 2
    conv = write(tmp_path, "conv.py", "import torch.nn as nn\nclass C(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.c = nn.Conv2d(3, 4, 3)\n    def forward(self, x):\n        return self.c(x).sum((1, 2, 3))\n")
    err = error_of(conv)
    assert "3,H,W" in err.cause
    assert load(conv, input_shape=(3, 8, 8))[0].input_shape == (3, 8, 8)
    # forward order, not registration order, decides which layer comes first
    order = write(tmp_path, "order.py", "import torch.nn as nn\nclass O(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.head = nn.Linear(5, 1)\n        self.body = nn.Linear(7, 5)\n    def forward(self, x):\n        return self.head(self.body(x))\n")
    assert load(order)[0].input_shape == (7,)


def test_parse_shape():
    assert parse_shape("3,32,32") == parse_shape("3x32x32") == parse_shape([3, 32, 32]) == (3, 32, 32)
    for bad in ("", "3,-1", "a,b", [0], [2.5]):
        with pytest.raises(ValueError):
            parse_shape(bad)


# --------------------------------------------------------------------------- source locations


def test_locations_of_nested_shared_and_lambda_built_layers(tmp_path):
    path = write(
        tmp_path,
        "nested.py",
        """
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
                self.act = nn.LeakyReLU(0.2)

            def forward(self, x):
                return self.act(self.conv(x))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.b1 = Block(2)
                self.b2 = Block(2)
                shared = nn.Tanh()
                self.t1 = shared
                self.t2 = shared
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 1, bias=False))

            def forward(self, x):
                return self.head(self.t2(self.b2(self.t1(self.b1(x)))))

        RGAP_MODELS = {"Net": {"factory": Net, "input_shape": (2, 4, 4)}}
        """,
    )
    (m,) = load(path)
    locs = {k: v.line for k, v in m.layer_locations.items()}
    assert locs["b1"] == line_of(path, "self.b1 = Block(2)")  # where the block is built, not its super().__init__()
    assert locs["b2"] == line_of(path, "self.b2 = Block(2)")
    assert locs["b1.conv"] == locs["b2.conv"] == line_of(path, "nn.Conv2d(c, c, 3")
    assert locs["t1"] == locs["t2"] == line_of(path, "shared = nn.Tanh()")
    assert locs["head.1"] == line_of(path, "nn.Linear(2 * 4 * 4")
    source_line = Path(path).read_text().splitlines()[locs["head.1"] - 1]
    assert m.layer_locations["head.1"].col == source_line.index("nn.Linear") + 1
    assert m.location.line == line_of(path, "class Net")
    assert all(v.file == m.file for v in m.layer_locations.values())


def test_display_path_is_what_the_user_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    (m,) = load("./examples/../examples/mlp_bias.py")
    assert m.file == "examples/mlp_bias.py"
    assert m.layer_locations["fc1"].file == "examples/mlp_bias.py"


# --------------------------------------------------------------------------- import mechanics


def test_same_file_name_in_two_folders_and_sys_path_restored(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder, width in ((a, 3), (b, 5)):
        write(folder, "parts.py", f"WIDTH = {width}\n")
        write(folder, "model.py", "import torch.nn as nn\nfrom parts import WIDTH\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(WIDTH, 1)\n")
    before = list(sys.path)
    (ma,) = load(str(a / "model.py"))
    sys.modules.pop("parts", None)  # the sibling module is an ordinary import: cached under its own name
    (mb,) = load(str(b / "model.py"))
    sys.modules.pop("parts", None)
    assert (ma.input_shape, mb.input_shape) == ((3,), (5,))
    assert type(ma.module) is not type(mb.module)
    assert sys.path == before


def test_network_is_refused_while_user_code_runs(tmp_path):
    path = write(tmp_path, "net.py", "import socket\nimport torch.nn as nn\ndef make() -> nn.Module:\n    socket.create_connection(('example.com', 80), timeout=1)\n    return nn.Linear(2, 1)\n")
    err = error_of(path)
    assert "network access is disabled" in err.cause and err.line == 4 and err.model == "make"
    import socket

    assert socket.create_connection.__name__ == "create_connection"  # restored


def test_eval_mode(tmp_path):
    path = write(tmp_path, "drop.py", "import torch.nn as nn\ndef make() -> nn.Module:\n    return nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1))\n")
    (m,) = load(path)
    assert not m.module.training and not m.module[1].training


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, text, cause, line, model",
    [
        ("syntax.py", "import torch\ndef f(:\n    pass\n", "syntax error", 2, None),
        ("imports.py", "import torch\nimport not_a_real_package_xyz\n", "ModuleNotFoundError: No module named 'not_a_real_package_xyz'", 2, None),
        ("raises.py", "import torch\n\nraise RuntimeError('boom at import')\n", "RuntimeError: boom at import", 3, None),
        ("exits.py", "import sys\nsys.exit(3)\n", "sys.exit(3)", 2, None),
        ("empty.py", "import torch\nx = 1\n", "no model found", None, None),
        ("args.py", "import torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n", "need(s) constructor arguments", 3, None),
        (
            "ctor.py",
            "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        raise ValueError('bad width')\n",
            "constructing the model failed: ValueError: bad width",
            5,
            "Net",
        ),
        ("notmodule.py", "import torch.nn as nn\ndef make() -> nn.Module:\n    return 42\n", "returned int, not an nn.Module", 2, "make"),
    ],
)
def test_load_errors(tmp_path, name, text, cause, line, model):
    err = error_of(write(tmp_path, name, text))
    assert cause in err.cause
    assert err.file.endswith(name) and err.line == line and err.model == model
    assert "\n" not in err.one_line()


def test_missing_file_and_directory(tmp_path):
    err = error_of(str(tmp_path / "nope.py"))
    assert err.cause == "no such file" and err.file.endswith("nope.py")
    assert "is a directory" in error_of(str(tmp_path)).cause


def test_named_constructor_needs_arguments(tmp_path):
    path = write(tmp_path, "named.py", "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self, width, depth=2):\n        super().__init__()\n")
    err = error_of(path, ["Net"])
    assert "constructor needs arguments (width)" in err.cause and err.model == "Net" and err.line == 2


def test_memory_budget_refuses_before_allocating(tmp_path):
    # 100k x 100k float32 = 40 GB: must be refused from the meta-device build, in well under a second
    path = write(tmp_path, "huge.py", "import torch.nn as nn\nclass Huge(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(100_000, 100_000, bias=False)\n")
    start = time.perf_counter()
    err = error_of(path)
    assert time.perf_counter() - start < 5
    assert "too large for the memory budget" in err.cause and err.model == "Huge" and err.line == 2
    # activations count too: a small model on a big input with a small budget
    small = write(tmp_path, "small.py", "import torch.nn as nn\ndef make() -> nn.Module:\n    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))\n")
    err = error_of(small, input_shape=(3, 256, 256), memory_budget_mb=64)
    assert "activation entries" in err.cause
    assert load(small, input_shape=(3, 8, 8), memory_budget_mb=64)[0].input_shape == (3, 8, 8)


def test_allow_empty(tmp_path):
    path = write(tmp_path, "utils.py", "def helper():\n    return 1\n")
    assert list(iter_models(path, None, AuditOptions(), allow_empty=True)) == []


def test_constructed_weights_are_real(tmp_path):
    path = write(tmp_path, "seeded.py", "import torch, torch.nn as nn\ndef make() -> nn.Module:\n    torch.manual_seed(3)\n    return nn.Linear(4, 1)\n")
    (m,) = load(path)
    torch.manual_seed(3)
    assert torch.equal(m.module.weight, nn.Linear(4, 1).weight)
    assert m.module.weight.device.type == "cpu"


def test_weights_as_constructed_do_not_depend_on_what_ran_before():
    from rgap_audit.loader import load_models
    from rgap_audit.options import AuditOptions

    path = str(EXAMPLES / "relu_cnn.py")
    first = load_models(path, None, AuditOptions())[0].module
    torch.rand(1000)  # consume the global RNG as another model or file would
    state = torch.random.get_rng_state()
    second = load_models(path, None, AuditOptions())[0].module
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    other = load_models(path, None, AuditOptions(seed=1))[0].module
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))


@pytest.mark.parametrize(
    "entry, needle",
    [
        ('"output": 1.5', "output must be an index or a key"),
        ('"output": True', "output must be an index or a key"),
        ('"batch_dim": -1', "batch_dim must be an integer >= 0"),
        ('"private_input": -2', "private_input must be a position"),
        ('"example_inputs": (1, 2)', "example_inputs must be a function of the model"),
    ],
)
def test_declared_forward_call_is_validated(tmp_path, entry, needle):
    path = write(
        tmp_path,
        "m.py",
        f"""
        import torch.nn as nn
        RGAP_MODELS = {{"M": {{"factory": lambda: nn.Linear(3, 2), "input_shape": (3,), {entry}}}}}
        """,
    )
    err = error_of(path)
    assert needle in err.cause and err.model == "M" and err.line == 2


def test_example_inputs_give_the_input_shape_and_a_private_input_by_name(tmp_path):
    path = write(
        tmp_path,
        "m.py",
        """
        import torch
        import torch.nn as nn

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2, bias=False)

            def forward(self, mask, x):
                return self.fc(x * mask)

        RGAP_MODELS = {"Gated": {"factory": Gated, "example_inputs": lambda m: (torch.ones(1, 4), torch.zeros(1, 4)), "private_input": "x"}}
        """,
    )
    (m,) = load(path)
    assert m.input_shape == (4,) and m.call.private_input == "x"
    bad = path.replace("m.py", "bad.py")
    Path(bad).write_text(Path(path).read_text().replace('"private_input": "x"', '"private_input": "y"'))
    err = error_of(bad)
    assert err.cause == "private_input 'y' is not a parameter of forward (mask, x)" and err.model == "Gated"


def test_constructor_imports_name_the_missing_package(tmp_path):
    path = write(
        tmp_path,
        "m.py",
        """
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                import rgap_test_absent_backbones
                self.fc = nn.Linear(3, 1)
        """,
    )
    err = error_of(path)
    assert "No module named 'rgap_test_absent_backbones'" in err.cause
    assert "the model imports it when it is constructed: install the package that provides 'rgap_test_absent_backbones'" in err.cause
