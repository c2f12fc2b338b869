"""ONNX Runtime's infilling step (erniegen.onnx_runtime) gives PyTorch's log-probabilities and decodes PyTorch's
ids, greedy and beam, through the API and the command line; what it cannot run is refused, naming the option.

The tiny models' word embeddings are scaled up (as in test_precision.py) so that their predictions are far
from uniform: with the usual 0.02 init every top-2 gap is a near tie, and float noise could flip a decode.
"""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

import erniegen  # noqa: E402
from erniegen.cli import main  # noqa: E402
from erniegen.decoding import DecodeOptions, generate_ids  # noqa: E402
from conftest import REORDER, copying, step_side_by_side  # noqa: E402
from erniegen.ernie_gen import InfillingStepper  # noqa: E402
from erniegen.onnx_runtime import use_onnx_runtime  # noqa: E402
from erniegen.precision import apply_precision  # noqa: E402

SOURCES = [[4, 10, 11, 12, 5], [4, 30, 31, 32, 33, 34, 35, 5], [4, 20, 21, 5]]  # three lengths, one padded batch
BANNED = [0, 1, 3, 4, 6]


@pytest.fixture
def decisive(tiny_model):
    with torch.no_grad():
        tiny_model.embeddings.word.weight.mul_(30)
    return tiny_model


@pytest.fixture(params=["plain", "copy"])
def pair(request, decisive):
    """The PyTorch model and a copy of it whose steps ONNX Runtime runs; as trained without and with copying
    (a copy head whose attention is far from uniform and whose gate is open to both sides)."""
    if request.param == "copy":
        copying(decisive, gate_bias=0.0)
    return decisive, use_onnx_runtime(copy.deepcopy(decisive))


@torch.no_grad()
def test_step_log_probs_equal_pytorchs(pair):
    model, onnx = pair
    for steppers, expected, got in step_side_by_side(model, onnx, SOURCES):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert steppers[1].cache.length == steppers[0].cache.length == 8 + 6


@torch.no_grad()
def test_bound_step_equals_a_plain_run_of_the_session(pair):
    """The IOBinding path (inputs read in place, bound again only when the cache's buffers move) gives exactly
    what ``session.run`` on numpy copies gives, through the first step, beam expansion and reordering; every
    step's log-probabilities are a tensor of their own, not overwritten by the next step."""
    _, onnx = pair
    step = onnx.step_runner
    earlier: list[tuple[torch.Tensor, torch.Tensor]] = []

    def checked(ids, pos, types, mask, past, source):
        feed = step.feed(ids, pos, types, mask, past, source)
        logp, *new = step.session.run(None, {name: x.numpy().copy() for name, x in feed.items()})
        got = step(ids, pos, types, mask, past, source)
        assert torch.equal(got, torch.from_numpy(logp))
        t = ids.shape[1]
        for slot, k, v in zip(past, new[0::2], new[1::2]):
            assert torch.equal(slot.k[:, :, slot.length:slot.length + t], torch.from_numpy(k))
            assert torch.equal(slot.v[:, :, slot.length:slot.length + t], torch.from_numpy(v))
        earlier.append((got, got.clone()))
        return got

    onnx.step_runner = checked
    src_ids = torch.tensor([s + [0] * (8 - len(s)) for s in SOURCES])
    stepper = InfillingStepper(onnx, src_ids, torch.tensor([len(s) for s in SOURCES]), 8)
    prev = None
    for i in range(5):
        if i == 2:
            stepper.expand(2)
            stepper.reorder(torch.tensor(REORDER))
            prev = prev.repeat_interleave(2)[REORDER]
        prev = stepper.step(prev).argmax(-1)
    assert len(earlier) == 5
    assert all(torch.equal(got, kept) for got, kept in earlier)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_greedy_and_beam_decode_pytorchs_ids(pair, num_beams):
    model, onnx = pair
    opts = DecodeOptions(num_beams=num_beams, max_length=8, min_length=3, banned_ids=BANNED)
    expected = generate_ids(model, SOURCES, "infilling", batch_size=3, opts=opts)
    assert generate_ids(onnx, SOURCES, "infilling", batch_size=3, opts=opts) == expected
    assert all(len(ids) >= 2 for ids in expected)
    with pytest.raises(ValueError, match="runtime 'onnx' runs the infilling decoder only .*decoder 'typical'"):
        generate_ids(onnx, SOURCES, "typical", opts=opts)


def test_load_and_command_line_take_the_runtime(decisive, tmp_path):
    decisive.save_pretrained(tmp_path / "model")
    texts = ["the city river", "who was the king of the old city", "a new name"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"source": t}) + "\n" for t in texts))
    options = {"num_beams": 3, "max_length": 6}
    expected = erniegen.load(str(tmp_path / "model")).generate(texts, **options)
    assert erniegen.load(str(tmp_path / "model"), runtime="onnx").generate(texts, **options) == expected
    main(["generate", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"), "--output",
          str(tmp_path / "out.jsonl"), "--runtime", "onnx", "--num-beams", "3", "--max-length", "6"])
    assert [json.loads(x)["prediction"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == expected


def _refused(tmp_path, capsys, *options: str) -> str:
    """``erniegen generate`` with ``options``: must stop before reading anything (the model is not there)."""
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", str(tmp_path / "absent"), "--input", str(tmp_path / "absent.jsonl"),
              "--output", str(tmp_path / "out.jsonl"), *options])
    assert stop.value.code == 2
    assert not (tmp_path / "out.jsonl").exists()
    return capsys.readouterr().err


def test_what_onnx_cannot_run_is_refused_naming_the_option(decisive, tmp_path, capsys):
    absent = str(tmp_path / "absent")  # refused before any load
    with pytest.raises(ValueError, match="runtime 'onnx' runs fp32 weights only, got precision 'int8'"):
        erniegen.load(absent, precision="int8", runtime="onnx")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; choose from torch, onnx, compile"):
        erniegen.load(absent, runtime="tensorrt")
    assert "got precision 'bf16'" in _refused(tmp_path, capsys, "--runtime", "onnx", "--precision", "bf16")
    assert "got decoder 'nar'" in _refused(tmp_path, capsys, "--runtime", "onnx", "--decoder", "nar")
    assert "--runtime: invalid choice: 'tvm'" in _refused(tmp_path, capsys, "--runtime", "tvm")
    decisive.settings.method = "typical"  # its own decoder is not infilling: refused before the export
    with pytest.raises(ValueError, match="got decoder 'typical'"):
        use_onnx_runtime(decisive)
    decisive.settings.method = "ernie-gen"
    with pytest.raises(ValueError, match="got precision 'int8'"):
        use_onnx_runtime(apply_precision(decisive, "int8"))
    assert decisive.step_runner is None


def test_without_onnxruntime_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(ImportError, match=r'pip install "erniegen\[onnx\]"'):
        erniegen.load(str(tmp_path / "absent"), runtime="onnx")
    assert 'pip install "erniegen[onnx]"' in _refused(tmp_path, capsys, "--runtime", "onnx")
    assert "absent.jsonl" in _refused(tmp_path, capsys)  # the torch runtime does not need it: stops at the input


def test_every_layer_norm_is_fused_with_its_residual_add(decisive, tmp_path):
    """With the shapes annotated (with_symbolic_shapes), ONNX Runtime folds each residual add, bias add and
    LayerNorm into one SkipLayerNormalization: two per layer and the embeddings' (the sum of word, position and
    type rows); only the LM head's LayerNorm, which has no residual, stays plain (without the shapes, 1 of the
    2 * layers + 1 was fused)."""
    import onnx
    import onnxruntime

    from erniegen.onnx_runtime import export_step, session_options
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "step.onnx")
    onnxruntime.InferenceSession(export_step(decisive), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "step.onnx")).graph.node]
    layers = decisive.config.num_hidden_layers
    assert ops.count("SkipLayerNormalization") == 2 * layers + 1
    assert ops.count("LayerNormalization") == 1
