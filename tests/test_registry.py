"""The method registry is what the command line, fine-tuning and decoding read; the refactor that
introduced it changed no output: a model saved today decodes as before, and the layer-stepping path
is the forward path."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import erniegen
from erniegen import registry
from erniegen.cli import build_parser
from erniegen.decoding import DECODERS, generate_ids
from erniegen.ernie_gen import build_objective as build_ernie_gen_objective
from erniegen.masks import attention_mask, source_roles
from erniegen.mist import length_head
from erniegen.model import Transformer
from erniegen.search import DecodeOptions, Decoder

from conftest import tiny_config

SOURCES = [[4, 10, 11, 12, 5], [4, 20, 21, 5], [4, 30, 31, 32, 33, 34, 5]]


# ---- every caller reads the registry ------------------------------------------------------------


def _choices(parser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_cli_choices_come_from_the_registry():
    parser = build_parser()
    assert _choices(parser, "finetune", "--method") == list(registry.METHODS) == ["ernie-gen", "typical", "nat",
                                                                                  "mist", "elmer", "elmer-soft"]
    assert _choices(parser, "pretrain", "--method") == list(registry.ERNIE_GEN.methods)
    helps = {a.help for sub in next(a for a in parser._actions if a.dest == "command").choices.values()
             for a in sub._actions if "--method" in a.option_strings}
    assert registry.method_help() in helps and all(f"{m}: " in registry.method_help() for m in registry.METHODS)
    for command in ("generate", "bench"):
        assert _choices(parser, command, "--decoder") == list(registry.DECODERS)
    assert DECODERS is registry.DECODERS
    assert sorted(DECODERS) == ["elmer-hard", "elmer-soft", "infilling", "mask-predict", "mist-iter", "nar",
                                "typical"]


def test_records_of_today():
    assert {m: registry.default_decoder(m) for m in registry.METHODS} == {
        "ernie-gen": "infilling", "typical": "typical", "nat": "nar", "mist": "nar", "elmer": "elmer-hard",
        "elmer-soft": "elmer-soft"}
    assert [registry.family(m).uses_noise for m in registry.METHODS] == [True, True, False, False, False, False]
    assert registry.option_keys("ernie-gen") == ["word_weight", "copy"]
    assert set(registry.option_keys("mist")) == {"mask_mode", "f_ratio", "length_weight", "mixing", "pseudo_from"}
    with pytest.raises(ValueError, match="unknown method 'lplm'"):
        registry.family("lplm")
    with pytest.raises(ValueError, match=r"unknown nat method_options \['mixingg'\]"):
        registry.check_options("nat", {"mixingg": "none"})
    # values too, before any model or data is loaded (the options dataclass's own checks)
    with pytest.raises(ValueError, match=r"nat method_options \{'mask_mode': 'glatt'\}: mask_mode must be one of"):
        registry.check_options("nat", {"mask_mode": "glatt"})
    with pytest.raises(ValueError, match="gold_rate is only used with --method elmer-soft"):
        registry.check_options("elmer", {"gold_rate": 0.5})
    registry.check_options("elmer-soft", {"gold_rate": 0.5})


METHOD_NAMES = set(registry.METHODS)
# modules of a family may tell their own methods apart; everything else asks the registry
FAMILY_MODULES = {"registry.py", "ernie_gen.py", "mist.py", "nar.py", "elmer.py"}


def _compares_a_method_name(node: ast.Compare) -> bool:
    for side in [node.left, *node.comparators]:
        values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
        if any(isinstance(v, ast.Constant) and v.value in METHOD_NAMES for v in values):
            return True
    return False


def test_no_method_branches_outside_the_families():
    package = Path(erniegen.__file__).parent
    found = [f"{path.name}:{node.lineno}" for path in sorted(package.glob("*.py")) if path.name not in FAMILY_MODULES
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Compare)
             and _compares_a_method_name(node)]
    assert found == []


@dataclasses.dataclass
class EchoOptions:
    label_smoothing: float = 0.1
    tag: str = "x"


class EchoDecoder(Decoder):
    """Returns each source's first content token: proof that the registry's decoder ran."""

    name = "echo-dec"
    calls = 0

    def __call__(self, model, src_ids, src_len, opts):
        EchoDecoder.calls += 1
        return [[int(row[1])] for row in src_ids]


@pytest.fixture
def echo_family(monkeypatch):
    """A family registered under the method name ``echo``, recording what fine-tuning asks of it."""
    seen = {}

    def build(method, model, preset, options):
        seen["build"] = (method, options)
        return build_ernie_gen_objective("ernie-gen", model, preset, {})

    def prepare(method, features, options):
        seen["prepare"] = (method, len(features), options)
        return list(features)

    family = registry.Family(name="Echo", methods={"echo": "echo-dec"}, options=EchoOptions, build_objective=build,
                             decoders={"echo-dec": EchoDecoder}, uses_noise=True, about={"echo": "says its input"},
                             prepare_features=prepare)
    monkeypatch.setitem(registry.METHODS, "echo", family)
    monkeypatch.setitem(registry.DECODERS, "echo-dec", EchoDecoder)
    EchoDecoder.calls = 0
    return seen


def test_finetune_and_decoding_take_everything_from_the_record(echo_family, tiny_model, tmp_path):
    from erniegen.finetune import FinetuneConfig, finetune
    from erniegen.train import TrainConfig
    tiny_model.settings.method = "ernie-gen"
    tiny_model.save_pretrained(tmp_path / "tiny")
    rows = [{"source": "the city river", "target": "what city"}, {"source": "the king war", "target": "who"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = str(tmp_path / "pairs.jsonl")
    assert _choices(build_parser(), "finetune", "--method")[-1] == "echo"
    cfg = FinetuneConfig(train=pairs, dev=pairs, output=str(tmp_path / "run"), model=str(tmp_path / "tiny"),
                         task="default", method="echo", method_options={"tag": "y"}, max_source_len=16,
                         max_target_len=8, trainer=TrainConfig(output_dir="", max_steps=1, batch_size=2,
                                                               precision="fp32"))
    finetune(cfg)
    assert echo_family == {"prepare": ("echo", 2, {"tag": "y"}), "build": ("echo", {"tag": "y"})}
    assert EchoDecoder.calls >= 1  # the dev evaluation decoded with the record's default decoder
    with pytest.raises(ValueError, match=r"unknown echo method_options \['label_smoothing'\]"):
        finetune(dataclasses.replace(cfg, output=str(tmp_path / "run2"), method_options={"label_smoothing": 0}))
    model = erniegen.load(str(tmp_path / "run" / "best"))
    assert model.settings.method == "echo"
    assert model.generate(["the city river"]) == ["the"]  # the default decoder of the saved method
    assert generate_ids(model, [[4, 30, 5]], "echo-dec") == [[30]]


# ---- nothing changed ----------------------------------------------------------------------------

# Outputs of the code before the registry (main at 1e37748) for the seeded models below.
PINNED = {
    "infilling": [[66, 39, 79, 11, 64], [28, 66, 39, 79, 11], [79, 11, 64, 61, 28]],
    "infilling-beam3": [[66, 39, 79, 11, 64], [28, 66, 39, 79, 11], [79, 11, 64, 61, 28]],
    "typical": [[28, 79, 63, 38, 28], [28, 64, 44, 63, 38], [63, 38, 28, 9, 35]],
    "text": ["student hers to", "on student hers"],
    "nar": [[63, 63, 63, 63, 71, 75], [40, 63, 63, 63, 63, 71], [63, 63, 71, 75, 63, 66]],
    "nar-beam3": [[63, 63, 63, 63], [40, 63, 63, 63, 63, 71], [63, 63, 71, 75, 63, 66]],
    "mist-iter": [[66, 63, 63, 63, 40, 63], [63, 66, 63, 63, 63, 40], [63, 63, 40, 63, 63, 66]],
    "mask-predict": [[63, 63, 63, 63], [40, 63, 63, 63, 63, 71], [63, 63, 71, 75, 63, 66]],
    "nat-text": ["death death death death three.", "their death death death death three"],
}


def _saved_and_loaded(tmp_path, tokenizer, seed: int, method: str, length: int | None = None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    model.tokenizer = tokenizer
    if length is not None:
        length_head(model, length)
    model.settings.method = method
    model.save_pretrained(tmp_path / method)
    return Transformer.from_pretrained(str(tmp_path / method)).eval()


def test_a_model_saved_today_decodes_as_before(tmp_path, tiny_tokenizer):
    model = _saved_and_loaded(tmp_path, tiny_tokenizer, 0, "ernie-gen")
    fixed = dict(max_length=6, min_length=6)
    assert generate_ids(model, SOURCES, "infilling", opts=DecodeOptions(**fixed)) == PINNED["infilling"]
    assert generate_ids(model, SOURCES, "infilling", opts=DecodeOptions(num_beams=3, **fixed)) == PINNED[
        "infilling-beam3"]
    assert generate_ids(model, SOURCES, "typical", opts=DecodeOptions(**fixed)) == PINNED["typical"]
    assert model.generate(["the city river", "what year"], max_length=5, min_length=5) == PINNED["text"]

    model = _saved_and_loaded(tmp_path, tiny_tokenizer, 1, "nat", length=8)
    assert generate_ids(model, SOURCES, "nar", opts=DecodeOptions(max_length=8)) == PINNED["nar"]
    assert generate_ids(model, SOURCES, "nar", opts=DecodeOptions(max_length=8, length_beam=3)) == PINNED["nar-beam3"]
    for name in ("mist-iter", "mask-predict"):
        opts = DecodeOptions(max_length=8, iterations=3, length_beam=2)
        assert generate_ids(model, SOURCES, name, opts=opts) == PINNED[name], name
    assert model.generate(["the city river", "what year"]) == PINNED["nat-text"]


# ---- the layer-stepping API ---------------------------------------------------------------------


def test_stepping_through_the_layers_is_the_forward_pass(tiny_model):
    ids = torch.tensor([[4, 10, 11, 12, 5], [4, 20, 21, 5, 0]])
    roles = source_roles(torch.tensor([5, 4]), 5)
    pos, types, mask = torch.arange(5).expand(2, 5), torch.zeros_like(ids), attention_mask(roles, roles)
    with torch.no_grad():
        hidden, kv = tiny_model(ids, pos, types, mask)
        x = tiny_model.embed(ids, pos, types)
        for i in range(len(tiny_model.layers)):
            x, layer_kv = tiny_model.run_layer(i, x, mask)
            assert torch.equal(layer_kv[0], kv[i][0]) and torch.equal(layer_kv[1], kv[i][1])
    assert torch.equal(x, hidden)


def test_tokens_that_stop_early_still_offer_keys_and_values(tiny_model):
    """ELMER's hard exit in miniature: after layer 0, tokens 3-4 stop; at layer 1 the others attend to
    their keys/values, computed from their layer-0 states, as the past of a call for tokens 0-2 only."""
    ids = torch.tensor([[4, 10, 11, 12, 5]])
    pos, types = torch.arange(5)[None], torch.zeros_like(ids)
    everyone = torch.ones(1, 5, 5, dtype=torch.bool)
    with torch.no_grad():
        x = tiny_model.run_layer(0, tiny_model.embed(ids, pos, types), everyone)[0]
        joint = tiny_model.run_layer(1, x, everyone)[0]
        exited_kv = tiny_model.layers[1].attn.keys_values(x[:, 3:])
        # the past comes first in the keys: order the mask's columns (exited 3-4, then active 0-2) alike
        active, _ = tiny_model.run_layer(1, x[:, :3], torch.ones(1, 3, 5, dtype=torch.bool), past=exited_kv)
    assert torch.allclose(active, joint[:, :3], atol=1e-6)

