"""Shared fixtures: a tiny real tokenizer and tiny random models, so unit tests run in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("ERNIEGEN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

WORDS = ("the a an of to in is was what who when where which how why did does do and or for on at by with "
         "from as it he she they his her their this that city river king war year born first new old name "
         "called built made water steam engine power heat oxygen black death harvard university student "
         "question answer one two three four five ? . , ' s").split()
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ed", "##ing"]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(d))


def tiny_config(**kw):
    from erniegen.model import ModelConfig
    base = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return ModelConfig(**(base | kw))


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from erniegen.model import Transformer
    torch.manual_seed(0)
    m = Transformer(tiny_config())
    m.tokenizer = tiny_tokenizer
    return m.eval()


def copying(model, gate_bias: float | None = None, constant_gate: bool = False):
    """``model`` as trained with copying: a copy head whose query is large enough that attention is far from
    uniform; ``gate_bias`` set (and with ``constant_gate`` the gate's weights zeroed, so g = sigmoid(gate_bias)
    everywhere). Returns the head."""
    from erniegen.ernie_gen import COPY, copy_head
    model.settings.extra[COPY] = True
    head = copy_head(model, create=True)
    with torch.no_grad():
        head.query.weight.normal_(0, 1.0)
        if constant_gate:
            head.gate.weight.zero_()
        if gate_bias is not None:
            head.gate.bias.fill_(gate_bias)
    return head


# beam search's reorder of three sources' six rows (each copied twice): one row twice, one dropped
REORDER = [5, 0, 2, 2, 1, 4]


def step_side_by_side(model, other, sources: list[list[int]], order: list[int] | None = REORDER, steps: int = 7):
    """Infilling steppers of ``model`` and ``other`` over the same padded ``sources``, stepped together on
    ``model``'s greedy choices, with beam search's bookkeeping before step 3 unless ``order`` is None (each row
    copied twice, then the rows put in ``order``); yields (steppers, ``model``'s log-probabilities, ``other``'s)
    after every step."""
    from erniegen.ernie_gen import InfillingStepper
    width = max(len(s) for s in sources)
    src_ids = torch.tensor([s + [0] * (width - len(s)) for s in sources])
    src_len = torch.tensor([len(s) for s in sources])
    steppers = [InfillingStepper(m, src_ids, src_len, 8) for m in (model, other)]
    prev = None
    for i in range(steps):
        if i == 3 and order is not None:
            for s in steppers:
                s.expand(2)
                s.reorder(torch.tensor(order))
            prev = prev.repeat_interleave(2)[order]
        expected, got = (s.step(prev) for s in steppers)
        yield steppers, expected, got
        prev = expected.argmax(-1)


def save_tiny_minilm(directory: Path, max_positions: int) -> Path:
    """A tiny random model with the real MiniLM tokenizer (30,522 wordpieces), saved to ``directory``."""
    from transformers import AutoTokenizer

    from erniegen.model import Transformer, resolve_model_path
    torch.manual_seed(0)
    m = Transformer(tiny_config(vocab_size=30522, max_position_embeddings=max_positions))
    m.tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
    m.save_pretrained(directory)
    return directory


def needs_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared benchmark data)")
    return path
