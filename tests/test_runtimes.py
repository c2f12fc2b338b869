"""The ``compile`` runtime (erniegen.runtimes): the infilling step under torch.compile gives eager PyTorch's
log-probabilities and decodes its ids, greedy and beam, through the API and the command line, without compiling
again for new batch sizes or source lengths; what it cannot run is refused, naming the option.

Compiling is slow (seconds a graph), so one compiled model serves the module. Its word embeddings are scaled up
(as in test_onnx_runtime.py) so that float noise cannot flip a near tie in a decode.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import erniegen
from conftest import copying, step_side_by_side, tiny_config
from erniegen.cli import main
from erniegen.decoding import DecodeOptions, generate_ids
from erniegen.model import Transformer
from erniegen.precision import Int8Linear, apply_precision, calibrate
from erniegen.runtimes import runtime_of, use_runtime

SOURCES = [[4, 10, 11, 12, 5], [4, 30, 31, 32, 33, 34, 35, 5], [4, 20, 21, 5]]  # three lengths, one padded batch
BANNED = [0, 1, 3, 4, 6]


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    """An eager model that copies and a compiled copy of it, compiled once for the module (first step, later
    steps; one row, several rows)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    model.tokenizer = tiny_tokenizer
    with torch.no_grad():
        model.embeddings.word.weight.mul_(30)
    copying(model, gate_bias=0.0)
    compiled = use_runtime(copy.deepcopy(model), "compile")
    for rows in (SOURCES[:1], SOURCES):  # warm: every graph the tests below need
        generate_ids(compiled, rows, "infilling", batch_size=3, opts=DecodeOptions(max_length=3))
    return model, compiled


@torch.no_grad()  # generate's grad mode: the graphs the fixture compiled (inference_mode would compile its own)
def test_step_log_probs_equal_eager(pair):
    model, compiled = pair
    assert runtime_of(compiled) == "compile" and runtime_of(model) == "torch"
    for steppers, expected, got in step_side_by_side(model, compiled, SOURCES):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        for a, b in zip(steppers[0].cache.k + steppers[0].cache.v, steppers[1].cache.k + steppers[1].cache.v):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # the runner wrote the step's keys/values
    assert steppers[1].cache.length == steppers[0].cache.length == 8 + 6


@pytest.mark.parametrize("num_beams", [1, 3])
def test_greedy_and_beam_decode_eager_ids_without_compiling_again(pair, num_beams):
    """New batch sizes (beam rows, a last short batch) and source lengths run the graphs compiled already."""
    model, compiled = pair
    opts = DecodeOptions(num_beams=num_beams, max_length=8, min_length=3, banned_ids=BANNED)
    sources = SOURCES + [[4, 40, 41, 42, 43, 44, 45, 46, 47, 48, 5]]  # a longer source: a larger cache
    expected = generate_ids(model, sources, "infilling", batch_size=3, opts=opts)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate_ids(compiled, sources, "infilling", batch_size=3, opts=opts) == expected
    assert all(len(ids) >= 2 for ids in expected)
    with pytest.raises(ValueError, match="runtime 'compile' runs the infilling decoder only .*decoder 'typical'"):
        generate_ids(compiled, sources, "typical", opts=opts)


def test_load_and_command_line_take_the_runtime(pair, tmp_path, capsys):
    model, _ = pair
    model.save_pretrained(tmp_path / "model")
    texts = ["the city river", "who was the king of the old city"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"source": t}) + "\n" for t in texts))
    expected = erniegen.load(str(tmp_path / "model")).generate(texts, num_beams=2, max_length=5)
    assert runtime_of(erniegen.load(str(tmp_path / "model"), runtime="compile")) == "compile"
    main(["generate", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"), "--output",
          str(tmp_path / "out.jsonl"), "--runtime", "compile", "--num-beams", "2", "--max-length", "5"])
    assert [json.loads(x)["prediction"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == expected
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"), "--output",
              str(tmp_path / "nar.jsonl"), "--runtime", "compile", "--decoder", "nar"])
    assert stop.value.code == 2 and "runtime 'compile' runs the infilling decoder only" in capsys.readouterr().err
    assert not (tmp_path / "nar.jsonl").exists()


@pytest.fixture(scope="module")
def int8_pair(pair):
    """The eager model in int8, smoothed (its activation statistics from its own decoding), and a compiled copy."""
    model = copy.deepcopy(pair[0])
    model.int8_calibration = calibrate(model, ["the city river", "who was the king of the old city"])
    apply_precision(model, "int8")
    compiled = use_runtime(copy.deepcopy(model), "compile")
    counters.clear()
    for rows in (SOURCES[:1], SOURCES):
        generate_ids(compiled, rows, "infilling", batch_size=3, opts=DecodeOptions(max_length=3))
    return model, compiled, copy.deepcopy(counters)


@torch.no_grad()
def test_int8_step_compiles_to_onednn_products_with_eager_int8_log_probs(int8_pair):
    """int8 compiles through its quantize/dequantize form (Int8Linear._decomposed): the same activation scales as
    fbgemm's, so the step differs from eager int8 by the kernels' float rounding only, and not by a
    quantization step (log-probabilities here span ~40)."""
    model, compiled, compiling = int8_pair
    assert model.precision == compiled.precision == "int8"
    # whole graphs (first step or later x one row or several), every int8 product in them oneDNN's: at least the
    # fused query/key/value, attention output and ffn_in of each of 2 layers and the head's dense and vocabulary
    assert not compiling["graph_break"] and compiling["stats"]["unique_graphs"] == 4
    assert compiling["inductor"]["qlinear_weight_prepack_matcher_count"] >= 4 * 8
    # smoothed: query, key, value, their fused product and ffn_in in each of the 2 layers, and the head's dense
    assert sum(m.input_scale is not None for m in compiled.modules() if isinstance(m, Int8Linear)) == 11
    for steppers, expected, got in step_side_by_side(model, compiled, SOURCES):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
        for a, b in zip(steppers[0].cache.k + steppers[0].cache.v, steppers[1].cache.k + steppers[1].cache.v):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_int8_compiled_decodes_eager_int8_ids(int8_pair, num_beams):
    model, compiled, _ = int8_pair
    opts = DecodeOptions(num_beams=num_beams, max_length=8, min_length=3, banned_ids=BANNED)
    expected = generate_ids(model, SOURCES, "infilling", batch_size=3, opts=opts)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate_ids(compiled, SOURCES, "infilling", batch_size=3, opts=opts) == expected


@pytest.mark.parametrize("vnni", [False, True])
def test_compiling_int8_warns_on_a_cpu_without_vnni(tiny_tokenizer, monkeypatch, vnni):
    """Without VNNI Inductor's int8 products are slower than eager int8's (BENCHMARKS.md section 3), so choosing
    them there says so; with VNNI nothing is said. Building the runner compiles nothing yet."""
    model = Transformer(tiny_config()).eval()
    model.tokenizer = tiny_tokenizer
    model.int8_calibration = calibrate(model, ["the city river"])
    apply_precision(model, "int8")
    monkeypatch.setattr("erniegen.runtimes.full_range_activations", lambda: vnni)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        use_runtime(model, "compile")
    said = [str(w.message) for w in caught if "under runtime 'compile'" in str(w.message)]
    assert runtime_of(model) == "compile"
    assert len(said) == (0 if vnni else 1)
    assert vnni or "runtime torch is faster" in said[0]


@torch.no_grad()
def test_each_model_compiled_in_the_process_steps_with_its_own_weights(pair):
    """Every compiled model has graphs of its own (its weights are their constants), cached on a code object of its
    own (runtimes.own_forward): the graphs check their inputs' guards only, not which model they belong to, so a
    model must never find another's graphs (without own_forward the third model here ran the first's weights),
    and a third model must still compile rather than hit dynamo's recompile limit (it then ran eager). The limit
    is lowered to the 4 graphs the first model holds, so that two one-row graphs for each new model show it."""
    model, compiled = pair
    models = [(model, compiled)]
    for seed in (1, 2):
        torch.manual_seed(seed)
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        models.append((other, use_runtime(copy.deepcopy(other), "compile")))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4):
        for eager, fast in reversed(models):
            for _, expected, got in step_side_by_side(eager, fast, SOURCES[1:2], order=None, steps=3):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    codes = [fast.step_runner.flat.forward.__code__ for _, fast in models]
    assert len(set(map(id, codes))) == 3
    # the new models' graphs: first step and later, one row, under no_grad
    assert [len(_debug_get_cache_entry_list(code)) for code in codes[1:]] == [2, 2]
