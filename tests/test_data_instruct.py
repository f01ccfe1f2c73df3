"""Instruction data: records → conversations → chat-template rendering → response-only labels."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sft_actors.data import IGNORE_INDEX, InstructionCorpus, load_dataset
from sft_actors.data.chat_template import ChatRenderer, load_template_file, template_from_config
from sft_actors.data.instruct import Conversation, encode_conversation, encode_conversations, renderer_for
from sft_actors.data.registry import check_dataset
from sft_actors.errors import ConfigError, DatasetCorrupt
from sft_actors.model.hf_loader import hf_tokenizer
from sft_actors.model.tokenizer import BpeTokenizer, ByteTokenizer

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same with the assistant turn in {% generation %}, so transformers can report its own mask.
CHATML_GEN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It turns an object into JSON text."},
    {"role": "user", "content": "And json.loads?"},
    {"role": "assistant", "content": "The reverse: JSON text into an object — ünïcödé\u2028too."},
]


def as_conversation(chat: list[dict[str, str]]) -> Conversation:
    return Conversation(messages=tuple((m["role"], m["content"]) for m in chat), source="t:1", group="g")


def tiny_bpe() -> HfTokenizer:
    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [m["content"] for m in CHAT] * 20 + ["system user assistant helpful briefly"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face tokenizer folder saved by transformers itself, with a chat template."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_tok")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_bpe(),
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        chat_template=CHATML_GEN,
    )
    fast.save_pretrained(directory)
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    (directory / "config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 0}))
    return directory


def _ids(out: object) -> list[int]:
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return list(ids)  # type: ignore[call-overload]


def test_template_matches_transformers_ids_and_assistant_mask(hf_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = hf_tokenizer(hf_dir)
    assert ours is not None and ours.chat_template == CHATML_GEN
    ids, labels = encode_conversation(as_conversation(CHAT), ours, renderer_for(ours, ours.chat_template), 0)
    out = ref.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == _ids(out)
    mask = list(out["assistant_masks"])
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in mask]
    assert [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX] == [
        t for t, m in zip(ids, mask, strict=True) if m
    ]
    # the prompt for generation renders the same text as transformers' add_generation_prompt
    text = renderer_for(ours, ours.chat_template).render(
        as_conversation(CHAT[:2]).messages, add_generation_prompt=True
    )
    assert text == ref.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)


def test_chatml_labels_are_exactly_the_responses_and_their_end_of_turn() -> None:
    tok = BpeTokenizer(tiny_bpe(), bos_id=None, eos_id=2, pad_id=0)
    renderer = ChatRenderer(CHATML)
    ids, labels = encode_conversation(as_conversation(CHAT), tok, renderer, 2)
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    expected = "".join(m["content"] + "<|im_end|>\n" for m in CHAT if m["role"] == "assistant")
    assert tok.decode(learned) == expected
    assert tok.decode(ids) == renderer.render(as_conversation(CHAT).messages, add_generation_prompt=False)
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels, strict=True))


def test_plain_format_masks_all_but_response_and_eos() -> None:
    tok = ByteTokenizer()
    conv = Conversation(messages=(("user", "Say hi"), ("assistant", "hi there")), source="t:1", group="g")
    renderer = renderer_for(tok, None)
    ids, labels = encode_conversation(conv, tok, renderer, eos_id=0)
    assert bytes(ids[:-1]).decode() == "User: Say hi\n\nAssistant: hi there"
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert learned == [*b"hi there", 0]  # the response, then EOS
    assert labels[: len("User: Say hi\n\nAssistant: ")] == [IGNORE_INDEX] * len("User: Say hi\n\nAssistant: ")


def test_rows_are_padded_truncated_and_dropped_per_sample() -> None:
    tok = ByteTokenizer()
    short = Conversation(messages=(("user", "a"), ("assistant", "b")), source="s:1", group="g")
    long_prompt = Conversation(messages=(("user", "x" * 100), ("assistant", "y")), source="s:2", group="g")
    long_reply = Conversation(messages=(("user", "q"), ("assistant", "z" * 100)), source="s:3", group="g")
    out = encode_conversations([short, long_prompt, long_reply], tok, renderer_for(tok, None), seq_len=32)
    seqs = out.sequences
    assert out.dropped == 1 and out.truncated == 2 and len(seqs) == 2 and seqs.seq_len == 32
    first = seqs.labels[0].tolist()
    n = len("User: a\n\nAssistant: b") + 1
    assert first[n:] == [IGNORE_INDEX] * (32 - n) and seqs.input_ids[0, n:].tolist() == [0] * (32 - n)
    assert seqs.labels[1, -1].item() == ord("z")  # truncated on the right, the response partly kept
    with pytest.raises(ConfigError, match="no conversation keeps a response token"):
        encode_conversations([long_prompt], tok, renderer_for(tok, None), seq_len=32)


def test_chat_template_sources_and_errors(tmp_path: Path) -> None:
    assert (
        template_from_config(
            [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}], "c"
        )
        == "y"
    )
    assert template_from_config("z", "c") == "z" and template_from_config(None, "c") is None
    with pytest.raises(ConfigError, match="no 'default' template"):
        template_from_config([{"name": "a", "template": "x"}, {"name": "b", "template": "y"}], "c")
    (tmp_path / "t.jinja").write_text(CHATML)
    assert load_template_file(tmp_path / "t.jinja") == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert load_template_file(tmp_path / "tokenizer_config.json") == CHATML
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="does not parse"):
        load_template_file(tmp_path / "bad.jinja")
    with pytest.raises(ConfigError, match="cannot read chat template"):
        load_template_file(tmp_path / "missing.jinja")
    refuse = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(DatasetCorrupt, match="t:1: the chat template refuses this conversation: user first"):
        ChatRenderer(refuse).segments((("assistant", "x"),), "t:1")
    # the sandbox keeps templates away from Python internals
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(DatasetCorrupt):
        ChatRenderer(escape).segments((("user", "q"), ("assistant", "a")), "t:1")


def test_smollm2_gguf_carries_its_chat_template() -> None:
    gguf = pytest.importorskip("gguf")
    from sft_actors.model.gguf_loader import _read_tokenizer
    from sft_actors.model.spec import smollm2_path

    reader = gguf.GGUFReader(smollm2_path())
    tok = _read_tokenizer(reader, {"bos_id": 1, "eos_id": 2, "pad_id": 2})
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    ids, labels = encode_conversation(
        as_conversation(CHAT[1:3]), tok, renderer_for(tok, tok.chat_template), 2
    )
    learned = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert learned == "It turns an object into JSON text.<|im_end|>\n"
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_instruction_jsonl_pairs_and_chats(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"q": "What is 1+1?", "a": "2", "src": "math"},
        {
            "chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "src": "talk",
        },
    ] * 5
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    opts = {
        "kind": "instruction",
        "prompt_key": "q",
        "response_key": "a",
        "messages_key": "chat",
        "group_key": "src",
    }
    corpus = load_dataset(f"jsonl:{path}", split="train", heldout_fraction=0.2, **opts)
    assert (
        isinstance(corpus, InstructionCorpus) and len(corpus) == 8 and corpus.class_names == ("math", "talk")
    )
    assert corpus.documents[0].messages == (("user", "What is 1+1?"), ("assistant", "2"))
    check_dataset(f"jsonl:{path}", **opts)
    enc = corpus.encode(ByteTokenizer(), seq_len=64, template=None)
    assert len(enc.sequences) == 8 and enc.dropped == 0


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ({"prompt": "p"}, r"i\.jsonl:2: no 'response' field \(fields: 'prompt'\)"),
        ({"prompt": "p", "response": 3}, r"i\.jsonl:2: field 'response' is a int, not a string"),
        ({"other": 1}, r"i\.jsonl:2: neither 'messages' nor 'prompt'/'response'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"i\.jsonl:2: messages\[0\] must be an object with role",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, r"i\.jsonl:2: no assistant message"),
        ({"messages": "hi"}, r"i\.jsonl:2: 'messages' must be a non-empty list"),
    ],
)
def test_instruction_records_refused_with_file_and_line(
    tmp_path: Path, line: dict[str, object], error: str
) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "response": "r"}, line])
    with pytest.raises(DatasetCorrupt, match=error):
        check_dataset(f"jsonl:{path}", kind="instruction")


def test_instruction_options_are_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(ConfigError, match="kind must be one of"):
        check_dataset(f"jsonl:{path}", kind="chat")
    with pytest.raises(ConfigError, match="has no option 'prompt_field'; did you mean 'prompt_key'"):
        check_dataset(f"jsonl:{path}", prompt_field="x")
    with pytest.raises(ConfigError, match="chat_template applies to kind = 'instruction' only"):
        check_dataset(f"jsonl:{path}", chat_template="none")
    with pytest.raises(ConfigError, match="cannot read chat template"):
        check_dataset(f"jsonl:{path}", kind="instruction", chat_template=str(tmp_path / "nope.jinja"))


# ---------------------------------------------------------------- topology: check time and a run


def topology(data: dict[str, object], *, model: str = "llama-tiny") -> dict[str, object]:
    return {
        "run": {"name": "t", "model": model, "train": {"rounds": 1, "seq_len": 64}, "data": data},
        "actors": [
            {"name": "coordinator", "role": "coordinator", "port": 5000},
            {"name": "server", "role": "server", "port": 5001},
            {"name": "dev0", "role": "device", "cut": 1},
        ],
    }


def refused(d: dict[str, object], *fragments: str) -> str:
    from sft_actors.errors import TopologyError
    from sft_actors.topology.loader import parse_topology

    with pytest.raises(TopologyError) as info:
        parse_topology(d, source="t.toml")
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_check_time_refuses_bad_instruction_data_naming_file_and_line(tmp_path: Path) -> None:
    from sft_actors.plan.assign import device_plans
    from sft_actors.topology.loader import parse_topology

    path = write_jsonl(tmp_path / "i.jsonl", [{"q": "p", "a": "r"}, {"q": "p"}])
    data = {"dataset": f"jsonl:{path}", "kind": "instruction", "prompt_key": "q", "response_key": "a"}
    refused(topology(data), "[run.data]", "i.jsonl:2: no 'a' field (fields: 'q'); set response_key")
    write_jsonl(path, [{"q": "p", "a": "r"}] * 3)
    topo = parse_topology(topology(data), source="t.toml")
    opts = device_plans(topo)[0].data.options
    assert opts == {"kind": "instruction", "prompt_key": "q", "response_key": "a", "chat_template": "auto"}
    path.write_bytes(b'{"q": "p", "a": "r"}\n{"q": "\xff", "a": "r"}\n')
    refused(topology(data), "[run.data]", "i.jsonl:2: invalid UTF-8 at byte 28")


def test_check_time_refuses_misplaced_or_unknown_data_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "response": "r"}])
    refused(
        topology({"dataset": "stdlib-docs", "kind": "instruction"}),
        "[run.data]",
        "key 'kind'",
        "needs records",
    )
    refused(topology({"dataset": f"jsonl:{path}", "kind": "chat"}), "key 'kind'", "'chat' is not one of")
    refused(topology({"dataset": f"jsonl:{path}", "promt_key": "q"}), "promt_key", "prompt_key")
    refused(
        topology({"dataset": f"jsonl:{path}", "chat_template": "none"}), "key 'chat_template'", "instruction"
    )
    refused(
        topology({"dataset": f"jsonl:{path}", "text_key": "a", "options": {"text_key": "b"}}),
        "key 'options'",
        "set twice",
    )
    refused(
        topology(
            {"dataset": f"jsonl:{path}", "kind": "instruction", "chat_template": str(tmp_path / "no.jinja")}
        ),
        "key 'chat_template'",
        "cannot read chat template",
    )


def test_check_time_refuses_a_llama_folder_without_tokenizer(tmp_path: Path) -> None:
    from sft_actors.model import Llama, export_hf_llama
    from sft_actors.model.config import LlamaConfig

    model = tmp_path / "llama"
    # load_config checks the weights' headers against config.json: a real (tiny) checkpoint
    config = LlamaConfig(vocab_size=300, dim=64, num_blocks=2, num_heads=4, num_kv_heads=4, ffn_dim=128)
    export_hf_llama(Llama(config), model)
    assert not (model / "tokenizer.json").exists()
    msg = refused(topology({"dataset": "stdlib-docs"}, model=str(model)), "[run]", "key 'model'")
    assert f"put tokenizer.json in {model}" in msg


def instruct_topology(tmp_path: Path) -> Path:
    """topologies/instruct.toml, shortened, writing under ``tmp_path``."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "topologies/instruct.toml").read_text()
    text = text.replace("topologies/data/instruct.jsonl", str(root / "topologies/data/instruct.jsonl"))
    text = text.replace('dir = "runs/instruct"', f'dir = "{tmp_path / "runs"}"')
    text = text.replace("rounds = 2", "rounds = 1").replace("steps_per_round = 4", "steps_per_round = 2")
    text = text.replace("port = 47320", "port = 0").replace("port = 47321", "port = 0")
    path = tmp_path / "instruct.toml"
    path.write_text(text)
    return path


def read_summary(tmp_path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        next((tmp_path / "runs").glob("instruct-*/summary.json")).read_text()
    )
    return summary


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_instruction_run_completes_on_llama_tiny(tmp_path: Path) -> None:
    from sft_actors.runtime import run_topology
    from sft_actors.topology import load_topology

    result = await run_topology(load_topology(instruct_topology(tmp_path)), transport="inproc", timeout_s=240)
    assert result.ok, result.failures
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed"
    assert summary["before"]["targets"] > 0 and summary["after"]["loss"] > 0


def test_check_time_renders_every_conversation_with_the_template(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"prompt": "p", "response": "r"},
            {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "u"}]},
        ],
    )
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations start with the user') }}"
        "{% endif %}" + CHATML
    )
    data = {"dataset": f"jsonl:{path}", "kind": "instruction", "chat_template": str(strict)}
    refused(
        topology(data), "key 'chat_template'", "i.jsonl:2: the chat template refuses", "start with the user"
    )


def test_hf_folder_template_from_tokenizer_config_list(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(tiny_bpe().to_str())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    tok = hf_tokenizer(tmp_path)
    assert tok is not None and tok.chat_template == CHATML and tok.eos_id == 2
    (tmp_path / "chat_template.jinja").write_text("J")  # transformers >= 4.50 saves it apart
    tok = hf_tokenizer(tmp_path)
    assert tok is not None and tok.chat_template == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    tok = hf_tokenizer(tmp_path)
    assert tok is not None and tok.chat_template is None


def test_gguf_cache_carries_the_template_and_replaces_an_older_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sft_actors.model import gguf_loader
    from sft_actors.model.config import PRESETS, LlamaConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "meta.json").write_text(json.dumps({"format": 1}))  # written by an older version
    config = PRESETS["llama-tiny"]
    assert isinstance(config, LlamaConfig)
    tok = BpeTokenizer(tiny_bpe(), bos_id=None, eos_id=2, pad_id=0, chat_template=CHATML)
    gguf_loader._write_cache(entry, config, tok, {})
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == gguf_loader.CACHE_FORMAT and meta["special"]["chat_template"] == CHATML
    again = BpeTokenizer.from_json((entry / "tokenizer.json").read_text(), **meta["special"])
    assert again.chat_template == CHATML and again.eos_id == 2


def test_instruction_folder_groups_and_sources(tmp_path: Path) -> None:
    (tmp_path / "math").mkdir()
    write_jsonl(tmp_path / "math" / "a.jsonl", [{"prompt": "1+1", "response": "2"}])
    write_jsonl(
        tmp_path / "top.jsonl", [{"prompt": "hi", "response": "hello"}, {"prompt": "x", "response": "y"}]
    )
    corpus = load_dataset(f"file:{tmp_path}", kind="instruction", heldout_fraction=0.0)
    assert isinstance(corpus, InstructionCorpus)
    assert [(c.source, c.group) for c in corpus.documents] == [
        ("top.jsonl:1", "top"),  # a folder's own files first, then its sub-folders (walk order)
        ("top.jsonl:2", "top"),
        ("math/a.jsonl:1", "math"),
    ]
    assert corpus.describe()["conversations"] == 3 and corpus.class_names == ("math", "top")
