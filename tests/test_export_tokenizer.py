"""An exported Llama folder is complete for ``transformers``: ``AutoTokenizer`` finds the base's
special tokens and chat template, ``GenerationConfig`` its EOS, and config.json keeps the base's
``pad_token_id`` and names the dtype as transformers 4.45+ and 5 read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sft_actors.model import BpeTokenizer, export_hf_llama, load_model
from sft_actors.model.config import LoraConfig
from sft_actors.train.run_adapters import DeviceModel
from sft_actors.train.run_export import write_merged

transformers = pytest.importorskip("transformers")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2


def _tokenizer(template: str | None) -> BpeTokenizer:
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(["user assistant hello world"] * 10, trainer)
    return BpeTokenizer(hf, bos_id=1, eos_id=2, pad_id=0, chat_template=template)


def _model(template: str | None = CHATML):  # type: ignore[no-untyped-def]
    model = load_model("llama-tiny")
    model.tokenizer = _tokenizer(template)
    return model


def _assert_complete(folder: Path, *, pad: int | None, template: str | None) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == pad and tok.model_max_length == 512
    assert tok.chat_template == template
    if template is not None:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = transformers.GenerationConfig.from_pretrained(str(folder))
    assert gen.eos_token_id == 2 and gen.bos_token_id == 1 and gen.pad_token_id == pad
    config = json.loads((folder / "config.json").read_text())
    assert config["pad_token_id"] == pad
    assert config["dtype"] == config["torch_dtype"] == "float32"


def test_merged_export_of_an_hf_base_keeps_its_tokenizer_and_null_pad(tmp_path: Path) -> None:
    base = export_hf_llama(_model(), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tok_config, "pad_token": None}))
    (base / "generation_config.json").unlink()
    model = load_model(str(base))  # the tokenizer as a run reads it: pad_id 0 by default
    out = tmp_path / "merged"
    write_merged(model, DeviceModel(device="base", cut=0, lora={}), LoraConfig(), out, base=base)
    _assert_complete(out, pad=None, template=CHATML)


def test_a_written_base_without_a_template_is_complete_too(tmp_path: Path) -> None:
    """``sft export --format peft --with-base`` writes the base with export_hf_llama."""
    from sft_actors.train.export_job import _write_base

    out = _write_base(_model(None), tmp_path / "base")
    _assert_complete(out, pad=0, template=None)
    with_template = _write_base(_model(), tmp_path / "templated")
    _assert_complete(with_template, pad=0, template=CHATML)


@pytest.mark.parametrize("template", [None, CHATML], ids=["plain", "chatml"])
def test_a_chat_prompt_is_encoded_as_training_encoded_the_prompt_part(template: str | None) -> None:
    from sft_actors.data.instruct import Conversation, encode_conversation, renderer_for
    from sft_actors.train.export_job import chat_prompt_ids

    tok = _tokenizer(template)
    conv = Conversation(messages=(("user", "hello"), ("assistant", "world")), source="t:1", group="g")
    ids, labels = encode_conversation(conv, tok, renderer_for(tok, template), eos_id=2)
    prompt = chat_prompt_ids(tok, "hello", "auto")
    assert ids[: len(prompt)] == prompt  # the same ids, no BOS added
    assert set(labels[: len(prompt)]) == {-100} and labels[len(prompt)] != -100


def test_run_json_records_the_data_kind_and_template(tmp_path: Path) -> None:
    from sft_actors.topology.loader import parse_topology
    from sft_actors.train.run_info import RunInfo, run_info

    data = tmp_path / "i.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n' * 3)
    topo = parse_topology(
        {
            "run": {
                "name": "t",
                "model": "llama-tiny",
                "data": {"dataset": f"jsonl:{data}", "kind": "instruction", "chat_template": "none"},
            },
            "actors": [
                {"name": "coordinator", "role": "coordinator", "port": 5000},
                {"name": "server", "role": "server", "port": 5001},
                {"name": "dev0", "role": "device", "cut": 1},
            ],
        },
        source="t.toml",
    )
    info = RunInfo.from_json(run_info(topo).to_json())
    assert (info.data_kind, info.chat_template) == ("instruction", "none")
    old = {k: v for k, v in run_info(topo).to_json().items() if k != "data"}  # before --chat
    assert RunInfo.from_json(old).data_kind == "text"
